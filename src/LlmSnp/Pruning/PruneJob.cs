using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Evaluation;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Pruning;

/// <summary>Everything `llmsnp prune` takes.</summary>
public sealed record PruneJobOptions
{
    public required string ModelDir { get; init; }
    public required string OutDir { get; init; }
    public required PruneOptions Prune { get; init; }
    public string CalibSource { get; init; } = TextSources.C4;
    public int CalibSamples { get; init; } = 128;
    public int? CalibSeqLen { get; init; }
    public string? EvalDataset { get; init; }
    public int? EvalSeqLen { get; init; }
    public int? EvalMaxWindows { get; init; }
    public bool Force { get; init; }
    public bool ExportPadded { get; init; }
    public Device Device { get; init; } = CPU;
    public ScalarType DType { get; init; } = ScalarType.Float32;
}

/// <summary>`llmsnp prune` for language models: calibrate, prune, write, and optionally evaluate dense and pruned.</summary>
public static class PruneJob
{
    public static JsonObject Run(PruneJobOptions o, Action<string>? log)
    {
        o.Prune.Validate();
        using var model = new OptModel(o.ModelDir, o.Device, o.DType);
        int calibLen = o.CalibSeqLen ?? Math.Min(2048, model.Config.MaxPositions);
        if (calibLen > model.Config.MaxPositions)
            throw new LlmSnpException($"--calib-seqlen {calibLen} exceeds the model's max_position_embeddings ({model.Config.MaxPositions})");
        int? evalLen = o.EvalSeqLen;
        if (evalLen > model.Config.MaxPositions)
            throw new LlmSnpException($"--eval-seqlen {evalLen} exceeds the model's max_position_embeddings ({model.Config.MaxPositions})");
        if (o.EvalDataset == TextSources.WikiText2 && o.CalibSource == TextSources.WikiText2)
            log?.Invoke("warning: calibrating and evaluating on the same WikiText-2 test text");

        int[]? evalIds = null;
        JsonObject? dense = null;
        if (o.EvalDataset != null)
        {
            evalIds = PerplexityJob.Tokenize(o.ModelDir, o.EvalDataset, log);
            log?.Invoke("evaluating the dense model");
            dense = PerplexityJob.Measure(model, evalIds, o.EvalDataset, evalLen, o.EvalMaxWindows, log);
        }

        var tok = OptTokenizer.ForModel(o.ModelDir);
        var calib = CalibrationSet.Sample(tok, o.CalibSource, o.CalibSamples, calibLen, o.Prune.Seed);
        log?.Invoke($"calibration: {o.CalibSamples} windows × {calibLen} tokens from {TextSources.Describe(o.CalibSource)}");
        int micro = Math.Max(1, 4096 / calibLen);
        var batches = Enumerable.Range(0, (o.CalibSamples + micro - 1) / micro)
            .Select(i => calib.Ids.narrow(0, i * micro, Math.Min(micro, o.CalibSamples - i * micro)).to(o.Device)).ToList();
        var calibInfo = new JsonObject
        {
            ["source"] = TextSources.Describe(o.CalibSource),
            ["samples"] = o.CalibSamples, ["seqlen"] = calibLen, ["seed"] = o.Prune.Seed,
            ["windows"] = new JsonArray(calib.Windows.Select(w => (JsonNode)new JsonArray(w.Document, w.Offset)).ToArray()),
            ["windows_format"] = "[document index, token offset]",
        };
        var report = PrunedCheckpoint.Write(new PrunedCheckpoint.Request
        {
            Model = model, Options = o.Prune, Calibration = batches, CalibrationInfo = calibInfo,
            OutDir = o.OutDir, SourceDir = o.ModelDir, ParamsBefore = model.ParameterCount(),
            Force = o.Force, ExportPadded = o.ExportPadded, PaddedConfig = model.PaddedConfig,
            SourceHashes = model.Checkpoint.Sha256,
        }, log);
        batches.ForEach(b => b.Dispose());
        calib.Ids.Dispose();
        report["output"] = o.OutDir;
        if (evalIds != null)
        {
            log?.Invoke("evaluating the pruned model");
            using var pruned = new OptModel(o.OutDir, o.Device, o.DType);
            var after = PerplexityJob.Measure(pruned, evalIds, o.EvalDataset!, evalLen, o.EvalMaxWindows, log);
            report["eval"] = new JsonObject { ["dense"] = dense, ["pruned"] = after };
        }
        return report;
    }
}
