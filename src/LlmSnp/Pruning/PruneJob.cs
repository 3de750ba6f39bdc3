using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Data.Images;
using LlmSnp.Evaluation;
using LlmSnp.Evaluation.Tasks;
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
    /// <summary>With an evaluation, also measure dense and pruned inference speed (prefill at the evaluation length, batch-1 decode).</summary>
    public bool MeasureSpeed { get; init; } = true;
    public Device Device { get; init; } = CPU;
    public ScalarType DType { get; init; } = ScalarType.Float32;
}

/// <summary>Dense and pruned values of one metric (perplexity, top-1 %), with the evaluators' full reports.</summary>
public sealed record MetricPair(string Metric, double Dense, double Pruned, int Samples, JsonObject DenseDetails, JsonObject PrunedDetails);

/// <summary>An accuracy measurement of one image classifier on a set of images.</summary>
public sealed record AccuracyReport(double Top1, double Top5, int Images, int Skipped, long Parameters, double Seconds)
{
    public JsonObject ToJson() => new()
    {
        ["top1"] = Top1, ["top5"] = Top5, ["images"] = Images, ["skipped"] = Skipped, ["parameters"] = Parameters, ["seconds"] = Seconds,
    };
}

/// <summary>What `prune` did: the written checkpoint, its report (pruning_config.json), and the measurements.</summary>
public sealed record PruneOutcome(string Output, JsonObject Report, MetricPair? Eval, SpeedUp? Speed)
{
    public long ParamsBefore => Report["params_before"]!.GetValue<long>();
    public long ParamsAfter => Report["params_after"]!.GetValue<long>();
    public double PrunableFractionRemoved => Report["prunable_fraction_removed"]!.GetValue<double>();

    /// <summary>The CLI's JSON: the report, where it was written, and the measurements.</summary>
    public JsonObject ToJson()
    {
        var j = (JsonObject)Report.DeepClone();
        j["output"] = Output;
        if (Eval != null) j["eval"] = new JsonObject { ["dense"] = Eval.DenseDetails.DeepClone(), ["pruned"] = Eval.PrunedDetails.DeepClone() };
        if (Speed != null) j["speed"] = Speed.ToJson();
        return j;
    }
}

/// <summary>`llmsnp prune`: calibrate, prune, write, and optionally evaluate dense and pruned.</summary>
public static class PruneJob
{
    public const string AccuracyEval = "accuracy";

    public static PruneOutcome Run(PruneJobOptions o, Action<string>? log)
    {
        o.Prune.Validate();
        if (o.ExportPadded && o.Prune.Experts is not null) throw new LlmSnpException(PrunedCheckpoint.PaddedWithoutExperts);
        var outcome = ModelFamilies.Of(o.ModelDir).Modality == Modality.Image ? RunImage(o, log) : RunText(o, log);
        if (outcome.Eval != null) ModelCard.Write(o.OutDir, outcome.Report, o.ModelDir, o.OutDir, outcome.Eval, outcome.Speed);   // the card gains this run's measurements
        return outcome;
    }

    static PruneOutcome RunText(PruneJobOptions o, Action<string>? log)
    {
        if (o.EvalDataset == AccuracyEval) throw new LlmSnpException("--eval accuracy is for image models; use --eval wikitext2, c4, tinystories, a text file or tasks:LIST");
        using var model = ModelFamilies.OpenLanguageModel(o.ModelDir, o.Device, o.DType, "prune");
        o.Prune.Experts?.CheckAgainst(model);
        int calibLen = o.CalibSeqLen ?? Math.Min(2048, model.MaxPositions);
        if (calibLen > model.MaxPositions)
            throw new LlmSnpException($"--calib-seqlen {calibLen} exceeds the model's max_position_embeddings ({model.MaxPositions})");
        int? evalLen = o.EvalSeqLen;
        if (evalLen > model.MaxPositions)
            throw new LlmSnpException($"--eval-seqlen {evalLen} exceeds the model's max_position_embeddings ({model.MaxPositions})");
        if (o.EvalDataset != null && TaskEvalJob.TaskList(o.EvalDataset) == null && TextSources.Overlap(o.CalibSource, o.EvalDataset))
            log?.Invoke($"warning: calibrating and evaluating on the same text ({TextSources.Describe(o.CalibSource)})");

        int[]? evalIds = null;
        PerplexityReport? dense = null;
        // `--eval tasks:a,b`: zero-shot accuracy of the dense and the pruned model on the same documents.
        var taskSets = TaskEvalJob.TaskList(o.EvalDataset) is string list ? TaskCatalog.Load(list, o.EvalLimit) : null;
        TaskRun? denseTasks = null;
        if (taskSets != null)
        {
            log?.Invoke("evaluating the dense model");
            denseTasks = TaskEvalJob.Evaluate(model, model.Tokenizer(), taskSets, BosPolicy.Auto, log);
        }
        else if (o.EvalDataset != null)
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
        if (evalIds == null && denseTasks == null) return new PruneOutcome(o.OutDir, report, null, null);
        log?.Invoke("evaluating the pruned model");
        using var pruned = ModelFamilies.OpenLanguageModel(o.OutDir, o.Device, o.DType);
        MetricPair eval;
        if (denseTasks != null)
        {
            var afterTasks = TaskEvalJob.Evaluate(pruned, pruned.Tokenizer(), taskSets!, BosPolicy.Auto, log);
            eval = new MetricPair("mean_acc", denseTasks.Summary.MeanAcc, afterTasks.Summary.MeanAcc, denseTasks.Encoded.Rows.Count, denseTasks.ToJson(), afterTasks.ToJson());
        }
        else
        {
            var after = PerplexityJob.Measure(pruned, evalIds!, o.EvalDataset!, evalLen, o.EvalLimit, log);
            eval = new MetricPair("perplexity", dense!.Perplexity, after.Perplexity, dense.Windows, dense.ToJson(), after.ToJson());
        }
        SpeedUp? speed = null;
        if (o.MeasureSpeed)
        {
            // Same machine, same run: prefill at the evaluation length (the default window for tasks), batch-1 decode.
            int prompt = Math.Min(dense?.SeqLen ?? Math.Min(2048, model.MaxPositions), model.MaxPositions - InferenceBench.DecodeSteps);
            log?.Invoke("measuring dense and pruned inference speed");
            var d = InferenceBench.Measure(model, prompt, log: log);
            var p = InferenceBench.Measure(pruned, prompt, log: log);
            long prunable = report["prunable_params"]!.GetValue<long>(), removed = report["prunable_params_removed"]!.GetValue<long>();
            speed = new SpeedUp(d, p, FlopRatio: (double)prunable / Math.Max(1, prunable - removed));
        }
        return new PruneOutcome(o.OutDir, report, eval, speed);
    }

    static JsonObject Write(PruneJobOptions o, IPrunableModel model, IReadOnlyList<Tensor> batches, JsonObject calibInfo, Action<string>? log) =>
        PrunedCheckpoint.Write(new PrunedCheckpoint.Request
        {
            Model = model, Options = o.Prune, Calibration = batches, CalibrationInfo = calibInfo,
            OutDir = o.OutDir, SourceDir = o.ModelDir, ParamsBefore = model.ParameterCount(),
            Force = o.Force, ExportPadded = o.ExportPadded,
        }, log);

    /// <summary>Image models: calibration images from a labelled folder, evaluation on images never used to calibrate.</summary>
    static PruneOutcome RunImage(PruneJobOptions o, Action<string>? log)
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
        AccuracyReport? dense = null;
        try
        {
            if (o.EvalDataset == AccuracyEval)
            {
                var calibFiles = calibImages.Select(i => Path.GetFullPath(i.Path)).ToHashSet();
                var evalSet = ImageSet.Load(o.EvalImages!).Images.Where(i => !calibFiles.Contains(Path.GetFullPath(i.Path))).ToList();
                if (o.EvalLimit is int limit) evalSet = evalSet.Take(limit).ToList();
                evalImages = ImageInputs.Load(evalSet, cfg, log);
                log?.Invoke($"evaluating the dense model on {evalImages.Labels.Length} images (calibration images excluded)");
                dense = Accuracy(model, evalImages, o.ImageBatch);
            }
            var batches = ImageInputs.MicroBatches(calib.Pixels, o.ImageBatch);
            var calibInfo = new JsonObject
            {
                ["source"] = o.CalibSource, ["samples"] = calib.Labels.Length, ["seed"] = o.Prune.Seed, ["skipped"] = calib.Skipped,
                ["images"] = new JsonArray(calib.Files.Select(f => (JsonNode)Path.GetFileName(f)).ToArray()),
            };
            var report = Write(o, model, batches, calibInfo, log);
            if (evalImages == null) return new PruneOutcome(o.OutDir, report, null, null);
            log?.Invoke("evaluating the pruned model");
            using var pruned = ModelFamilies.OpenImageClassifier(o.OutDir, o.Device, o.DType);
            var after = Accuracy(pruned, evalImages, o.ImageBatch);
            return new PruneOutcome(o.OutDir, report, new MetricPair("top1", dense!.Top1, after.Top1, dense.Images, dense.ToJson(), after.ToJson()), null);
        }
        finally { evalImages?.Dispose(); }
    }

    static AccuracyReport Accuracy(IImageClassifier model, ImageBatch images, int batch)
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var (top1, top5) = AccuracyJob.Measure(model, images, batch);
        return new AccuracyReport(top1, top5, images.Labels.Length, images.Skipped, model.ParameterCount(), sw.Elapsed.TotalSeconds);
    }
}
