using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Data.Images;
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
    /// <summary>Evaluate only the first N windows (text) or images.</summary>
    public int? EvalLimit { get; init; }
    public bool Force { get; init; }
    public bool ExportPadded { get; init; }
    /// <summary>Image folder for `--eval accuracy` (image models).</summary>
    public string? EvalImages { get; init; }
    public int ImageBatch { get; init; } = 32;
    public Device Device { get; init; } = CPU;
    public ScalarType DType { get; init; } = ScalarType.Float32;
}

/// <summary>`llmsnp prune`: calibrate, prune, write, and optionally evaluate dense and pruned.</summary>
public static class PruneJob
{
    public const string AccuracyEval = "accuracy";

    public static JsonObject Run(PruneJobOptions o, Action<string>? log)
    {
        o.Prune.Validate();
        return ModelFamilies.Of(o.ModelDir).Modality == Modality.Image ? RunImage(o, log) : RunText(o, log);
    }

    static JsonObject RunText(PruneJobOptions o, Action<string>? log)
    {
        if (o.EvalDataset == AccuracyEval) throw new LlmSnpException("--eval accuracy is for image models; use --eval wikitext2, c4, tinystories or a text file");
        using var model = ModelFamilies.OpenLanguageModel(o.ModelDir, o.Device, o.DType, "prune");
        int calibLen = o.CalibSeqLen ?? Math.Min(2048, model.MaxPositions);
        if (calibLen > model.MaxPositions)
            throw new LlmSnpException($"--calib-seqlen {calibLen} exceeds the model's max_position_embeddings ({model.MaxPositions})");
        int? evalLen = o.EvalSeqLen;
        if (evalLen > model.MaxPositions)
            throw new LlmSnpException($"--eval-seqlen {evalLen} exceeds the model's max_position_embeddings ({model.MaxPositions})");
        if (o.EvalDataset != null && TextSources.Overlap(o.CalibSource, o.EvalDataset))
            log?.Invoke($"warning: calibrating and evaluating on the same text ({TextSources.Describe(o.CalibSource)})");

        int[]? evalIds = null;
        JsonObject? dense = null;
        if (o.EvalDataset != null)
        {
            evalIds = PerplexityJob.Tokenize(model, o.EvalDataset, log);
            log?.Invoke("evaluating the dense model");
            dense = PerplexityJob.Measure(model, evalIds, o.EvalDataset, evalLen, o.EvalLimit, log);
        }

        var calib = CalibrationSet.Sample(model.Tokenizer(), o.CalibSource, o.CalibSamples, calibLen, o.Prune.Seed);
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
        var report = Write(o, model, batches, calibInfo, log);
        batches.ForEach(b => b.Dispose());
        calib.Ids.Dispose();
        report["output"] = o.OutDir;
        if (evalIds != null)
        {
            log?.Invoke("evaluating the pruned model");
            using var pruned = ModelFamilies.OpenLanguageModel(o.OutDir, o.Device, o.DType);
            var after = PerplexityJob.Measure(pruned, evalIds, o.EvalDataset!, evalLen, o.EvalLimit, log);
            report["eval"] = new JsonObject { ["dense"] = dense, ["pruned"] = after };
        }
        return report;
    }

    static JsonObject Write(PruneJobOptions o, IPrunableModel model, IReadOnlyList<Tensor> batches, JsonObject calibInfo, Action<string>? log) =>
        PrunedCheckpoint.Write(new PrunedCheckpoint.Request
        {
            Model = model, Options = o.Prune, Calibration = batches, CalibrationInfo = calibInfo,
            OutDir = o.OutDir, SourceDir = o.ModelDir, ParamsBefore = model.ParameterCount(),
            Force = o.Force, ExportPadded = o.ExportPadded,
        }, log);

    /// <summary>Image models: calibration images from a labelled folder, evaluation on images never used to calibrate.</summary>
    static JsonObject RunImage(PruneJobOptions o, Action<string>? log)
    {
        if (o.EvalDataset != null && o.EvalDataset != AccuracyEval) throw new LlmSnpException($"--eval {o.EvalDataset}: image models are evaluated with --eval accuracy --images DIR");
        if (o.EvalDataset == AccuracyEval && o.EvalImages == null) throw new LlmSnpException("--eval accuracy needs --images DIR");
        if (o.CalibSource is TextSources.C4 or TextSources.WikiText2 or TextSources.TinyStories) throw new LlmSnpException($"--calib {o.CalibSource}: image models calibrate on a labelled image folder (--calib DIR)");
        using var model = ModelFamilies.OpenImageClassifier(o.ModelDir, o.Device, o.DType, "prune");
        var cfg = PreprocessConfig.Load(o.ModelDir);
        var all = ImageSet.Load(o.CalibSource).Images;
        var (calibImages, _) = ImageInputs.Split(all, Math.Min(o.CalibSamples, all.Count - 1), o.Prune.Seed);
        using var calib = ImageInputs.Load(calibImages, cfg, log);
        log?.Invoke($"calibration: {calib.Labels.Length} images from {o.CalibSource}");
        ImageBatch? evalImages = null;
        JsonObject? dense = null;
        try
        {
            if (o.EvalDataset == AccuracyEval)
            {
                var calibFiles = calibImages.Select(i => Path.GetFullPath(i.Path)).ToHashSet();
                var evalSet = ImageSet.Load(o.EvalImages!).Images.Where(i => !calibFiles.Contains(Path.GetFullPath(i.Path))).ToList();
                if (o.EvalLimit is int limit) evalSet = evalSet.Take(limit).ToList();
                evalImages = ImageInputs.Load(evalSet, cfg, log);
                log?.Invoke($"evaluating the dense model on {evalImages.Labels.Length} images (calibration images excluded)");
                dense = AccuracyReport(model, evalImages, o.ImageBatch);
            }
            var batches = ImageInputs.MicroBatches(calib.Pixels, o.ImageBatch);
            var calibInfo = new JsonObject
            {
                ["source"] = o.CalibSource, ["samples"] = calib.Labels.Length, ["seed"] = o.Prune.Seed, ["skipped"] = calib.Skipped,
                ["images"] = new JsonArray(calib.Files.Select(f => (JsonNode)Path.GetFileName(f)).ToArray()),
            };
            var report = Write(o, model, batches, calibInfo, log);
            report["output"] = o.OutDir;
            if (evalImages != null)
            {
                log?.Invoke("evaluating the pruned model");
                using var pruned = ModelFamilies.OpenImageClassifier(o.OutDir, o.Device, o.DType);
                report["eval"] = new JsonObject { ["dense"] = dense, ["pruned"] = AccuracyReport(pruned, evalImages, o.ImageBatch) };
            }
            return report;
        }
        finally { evalImages?.Dispose(); }
    }

    static JsonObject AccuracyReport(IImageClassifier model, ImageBatch images, int batch)
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var (top1, top5) = AccuracyJob.Measure(model, images, batch);
        return new JsonObject
        {
            ["top1"] = top1, ["top5"] = top5, ["images"] = images.Labels.Length, ["skipped"] = images.Skipped,
            ["parameters"] = model.ParameterCount(), ["seconds"] = sw.Elapsed.TotalSeconds,
        };
    }
}
