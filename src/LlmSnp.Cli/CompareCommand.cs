using System.CommandLine;

using LlmSnp;
using LlmSnp.Models;
using LlmSnp.Reporting;

/// <summary>`llmsnp compare`: every method at every ratio on one calibration set, with speed.</summary>
static class CompareCommand
{
    public static Command Build()
    {
        var model = Cli.ModelOption();
        var outDir = new Option<string>("--out") { Description = "directory for comparison.json, .csv and the PNG plots", Required = true };
        var ratios = new Option<string>("--ratios") { Description = "comma-separated fractions removed", DefaultValueFactory = _ => "0,0.1,0.2,0.3,0.4,0.5" };
        var methods = new Option<string?>("--methods") { Description = "comma-separated ordering[:reconstruct[:ratio|variance]] (default: SNP zca, zca-precision, obs, id with lstsq; zca with the variance policy; fluctuation:bias; wanda-sp, magnitude, random with none)" };
        var targets = new Option<string>("--targets") { Description = "target sets separated by ';', e.g. \"mlp;heads;mlp,heads\"", DefaultValueFactory = _ => "mlp;heads;mlp,heads" };
        var calib = new Option<string>("--calib") { DefaultValueFactory = _ => "c4", Description = "calibration text" };
        var samples = new Option<int>("--calib-samples") { DefaultValueFactory = _ => 32, Description = "calibration windows" };
        var calibLen = new Option<int?>("--calib-seqlen") { Description = "calibration window length" };
        var eval = new Option<string>("--eval") { DefaultValueFactory = _ => "wikitext2", Description = "evaluation text (perplexity), or tasks:piqa,arc_easy,… (mean zero-shot accuracy, a column per task)" };
        var evalLen = new Option<int?>("--eval-seqlen") { Description = "evaluation window length" };
        var evalWindows = new Option<int?>("--eval-limit", "--eval-max-windows") { Description = "evaluate the first N windows (text), documents of each task, or images" };
        var seed = new Option<int>("--seed") { DefaultValueFactory = _ => 0, Description = "seed" };
        var images = new Option<string?>("--images") { Description = "image models: labelled image folder; --calib-samples images calibrate, the others are evaluated" };
        var widthMultiple = PruneCliOptions.WidthMultipleOption();
        var noSpeed = new Option<bool>("--no-speed") { Description = "language models: skip measuring each pruned model's prefill and decode speed against dense" };
        var cmd = new Command("compare", "every method at every ratio on one calibration set: JSON, CSV and plots")
            { model, outDir, ratios, methods, targets, calib, samples, calibLen, eval, evalLen, evalWindows, seed, images, widthMultiple, noSpeed, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => CompareJob.Run(new CompareOptions
        {
            ModelDir = p.GetValue(model)!, OutDir = p.GetValue(outDir)!,
            Ratios = ParseRatios(p.GetValue(ratios)!),
            Methods = p.GetValue(methods) is string m ? ParseMethods(m) : Method.Defaults,
            TargetSets = ParseTargetSets(p.GetValue(targets)!),
            Calib = p.GetValue(calib)!, CalibSamples = p.GetValue(samples), CalibSeqLen = p.GetValue(calibLen),
            Eval = p.GetValue(eval)!, EvalSeqLen = p.GetValue(evalLen), EvalLimit = p.GetValue(evalWindows), Seed = p.GetValue(seed), Images = p.GetValue(images),
            WidthMultiple = p.GetValue(widthMultiple), MeasureSpeed = !p.GetValue(noSpeed),
            CommandLine = "llmsnp " + string.Join(' ', Environment.GetCommandLineArgs().Skip(1)),
        }, Cli.Log)));
        return cmd;
    }

    internal static List<double> ParseRatios(string s) =>
        s.Split(',').Select(r => double.TryParse(r, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var x) && x >= 0 && x < 1 ? x
            : throw new LlmSnpException($"--ratios: '{r}' is not a fraction in [0, 1)")).ToList();

    internal static List<Method> ParseMethods(string s) => s.Split(',').Select(m => Method.Parse(m, "--methods")).ToList();

    internal static List<string> ParseTargetSets(string s)
    {
        var sets = s.Split(';', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(t => NodeKinds.Describe(NodeKinds.ParseSet(t, "--targets"))).ToList();
        return sets.Count > 0 ? sets : throw new LlmSnpException($"--targets: '{s}' names no target set (e.g. \"mlp;heads;mlp,heads\")");
    }
}
