using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Evaluation;
using LlmSnp.Evaluation.Tasks;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Reporting;

/// <summary>Everything `llmsnp compare` takes.</summary>
public sealed record CompareOptions
{
    public required string ModelDir { get; init; }
    public required string OutDir { get; init; }
    public required IReadOnlyList<Method> Methods { get; init; }
    public required IReadOnlyList<double> Ratios { get; init; }
    public required IReadOnlyList<string> TargetSets { get; init; }
    public string Calib { get; init; } = TextSources.C4;
    public int CalibSamples { get; init; } = 32;
    public int? CalibSeqLen { get; init; }
    public string Eval { get; init; } = TextSources.WikiText2;
    public int? EvalSeqLen { get; init; }
    /// <summary>Evaluate the first N windows (text) or images.</summary>
    public int? EvalLimit { get; init; }
    /// <summary>Labelled image folder (image models): calibration images are drawn from it, the rest evaluated.</summary>
    public string? Images { get; init; }
    public double Damp { get; init; } = 0.01;
    public int Seed { get; init; }
    /// <summary>Every pruned MLP layer keeps a multiple of this many neurons.</summary>
    public int WidthMultiple { get; init; } = 1;
    /// <summary>Language models: time each pruned model (prefill, decode) against dense.</summary>
    public bool MeasureSpeed { get; init; } = true;
    public string CommandLine { get; init; } = "";
}

public static class CompareJob
{
    public static JsonObject Run(CompareOptions o, Action<string>? log) =>
        ModelFamilies.Of(o.ModelDir).Modality == Modality.Image ? RunImage(o, log) : RunText(o, log);

    /// <summary>Image models: top-1 on the images of the folder that were not drawn for calibration.</summary>
    public static JsonObject RunImage(CompareOptions o, Action<string>? log)
    {
        if (o.Images == null) throw new LlmSnpException("compare on an image model needs --images DIR (labelled images; calibration images are drawn from it and never evaluated)");
        long paramsBefore;
        using (var probe = ModelFamilies.OpenImageClassifier(o.ModelDir, use: "compare")) paramsBefore = probe.ParameterCount();
        var cfg = Data.Images.PreprocessConfig.Load(o.ModelDir);
        var all = Data.Images.ImageSet.Load(o.Images).Images;
        var (calibSet, rest) = ImageInputs.Split(all, o.CalibSamples, o.Seed);
        if (o.EvalLimit is int l) rest = rest.Take(l).ToList();
        using var calib = ImageInputs.Load(calibSet, cfg, log);
        using var eval = ImageInputs.Load(rest, cfg, log);
        var metric = new AccuracyMetric(eval.Pixels, eval.Labels);
        var result = Comparison.Run(new Comparison.Request
        {
            OpenModel = () => ModelFamilies.Open(o.ModelDir), Calibration = ImageInputs.MicroBatches(calib.Pixels, 32), Metric = metric,
            Methods = o.Methods, Ratios = o.Ratios, TargetSets = o.TargetSets, ParamsBefore = paramsBefore, Damp = o.Damp, Seed = o.Seed,
            WidthMultiple = o.WidthMultiple, SourceDir = o.ModelDir,
        }, log);
        var provenance = new JsonObject
        {
            ["model"] = Path.GetFileName(Path.GetFullPath(o.ModelDir).TrimEnd('/')), ["params_before"] = paramsBefore,
            ["calibration"] = $"{calib.Labels.Length} images drawn with seed {o.Seed} from {Path.GetFileName(Path.GetFullPath(o.Images).TrimEnd('/'))}",
            ["calibration_images"] = new JsonArray(calib.Files.Select(f => (JsonNode)Path.GetFileName(f)).ToArray()),
            ["evaluation"] = $"{eval.Labels.Length} other images of the same folder (none used for calibration), {eval.Skipped} unreadable",
            ["damp"] = o.Damp, ["command"] = o.CommandLine, ["date"] = DateTime.UtcNow.ToString("yyyy-MM-dd"),
        };
        return Comparison.Write(o.OutDir, $"{provenance["model"]}: top-1", "top-1 accuracy (%)", true, result, provenance);
    }

    /// <summary>Language models: perplexity on the evaluation text, calibration from a different text.</summary>
    public static JsonObject RunText(CompareOptions o, Action<string>? log)
    {
        string? taskList = TaskEvalJob.TaskList(o.Eval);
        if (taskList == null && TextSources.Overlap(o.Calib, o.Eval)) throw new LlmSnpException($"--calib and --eval are both '{o.Calib}': calibration and evaluation text must not overlap");
        var taskSets = taskList != null ? TaskCatalog.Load(taskList, o.EvalLimit) : null;
        int maxPos;
        long paramsBefore;
        ITextTokenizer tok;
        using (var probe = ModelFamilies.OpenLanguageModel(o.ModelDir, use: "compare")) { maxPos = probe.MaxPositions; paramsBefore = probe.ParameterCount(); tok = probe.Tokenizer(); }
        int calibLen = o.CalibSeqLen ?? Math.Min(2048, maxPos), evalLen = o.EvalSeqLen ?? Math.Min(2048, maxPos);
        var calib = CalibrationSet.Sample(tok, o.Calib, o.CalibSamples, calibLen, o.Seed);
        int micro = Math.Max(1, 4096 / calibLen);
        var batches = Enumerable.Range(0, (o.CalibSamples + micro - 1) / micro)
            .Select(i => calib.Ids.narrow(0, i * micro, Math.Min(micro, o.CalibSamples - i * micro))).ToList();
        IStreamedMetric metric;
        string evaluation;
        if (taskSets != null)
        {
            // Zero-shot tasks: mean accuracy (%) over them, a column per task (each pruned model scored in the pass that prunes it).
            var encoded = EncodedTasks.Encode(taskSets, tok, maxPos, BosPolicy.Auto, TaskEvalJob.ConfigPrefixToken(o.ModelDir));
            metric = new TaskMetric(encoded);
            evaluation = $"zero-shot tasks scored as lm-evaluation-harness: {string.Join(", ", taskSets.Select(t => $"{t.Name} ({t.Docs.Count} docs)"))}; metric = mean acc (%) over the tasks";
        }
        else
        {
            var ppl = new PerplexityMetric(tok.Encode(TextSources.EvaluationText(o.Eval)), evalLen, o.EvalLimit);
            metric = ppl;
            evaluation = $"{TextSources.Describe(o.Eval)}, {ppl.Windows} windows × {evalLen} tokens";
        }
        // Speed at the evaluation length (less the decode steps where that is the model's limit), as `prune --eval` measures it.
        int prompt = Math.Min(evalLen, maxPos - InferenceBench.DecodeSteps);
        var result = Comparison.Run(new Comparison.Request
        {
            OpenModel = () => ModelFamilies.Open(o.ModelDir), Calibration = batches, Metric = metric, Methods = o.Methods,
            Ratios = o.Ratios, TargetSets = o.TargetSets, ParamsBefore = paramsBefore, Damp = o.Damp, Seed = o.Seed,
            WidthMultiple = o.WidthMultiple, SourceDir = o.ModelDir,
            MeasureSpeed = o.MeasureSpeed ? dir => { using var m = ModelFamilies.OpenLanguageModel(dir); return InferenceBench.Measure(m, prompt); } : null,
        }, log);
        var provenance = new JsonObject
        {
            ["model"] = Path.GetFileName(Path.GetFullPath(o.ModelDir).TrimEnd('/')), ["params_before"] = paramsBefore,
            ["calibration"] = $"{o.CalibSamples} windows × {calibLen} tokens from {TextSources.Describe(o.Calib)}, seed {o.Seed}",
            ["evaluation"] = evaluation,
            ["damp"] = o.Damp, ["width_multiple"] = o.WidthMultiple, ["command"] = o.CommandLine,
            ["date"] = DateTime.UtcNow.ToString("yyyy-MM-dd"),
            ["speed"] = o.MeasureSpeed ? $"prefill of {prompt} tokens and batch-1 decode, best of {InferenceBench.Repeats}, each pruned model written and timed against dense in this run" : null,
        };
        if (taskSets != null)
            return Comparison.Write(o.OutDir, $"{provenance["model"]}: zero-shot accuracy", $"mean accuracy (%) over {string.Join(", ", taskSets.Select(t => t.Name))}", true, result, provenance);
        return Comparison.Write(o.OutDir, $"{provenance["model"]}: perplexity", $"perplexity ({TextSources.ShortName(o.Eval)})", false, result, provenance);
    }
}
