using System.CommandLine;
using System.Text.Json.Nodes;
using LlmSnp;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Pruning;

/// <summary>
/// `llmsnp demo`: the README's main job. Prunes the bundled trained OPT with automatic per-layer
/// ratios, measures dense and pruned perplexity in the same run and prints a summary table.
/// </summary>
static class DemoCommand
{
    public static Command Build(Func<ParseResult, Func<JsonObject>, int> run)
    {
        var outDir = new Option<string>("--out") { Description = "where pruned checkpoints and reports go", DefaultValueFactory = _ => "out" };
        var tau = new Option<double>("--variance") { Description = "τ of the automatic per-layer ratios", DefaultValueFactory = _ => 0.95 };
        var windows = new Option<int?>("--eval-max-windows") { Description = "WikiText-2 windows to evaluate (default: all 561)" };
        var samples = new Option<int>("--calib-samples") { Description = "calibration windows of 512 tokens", DefaultValueFactory = _ => 64 };
        var cmd = new Command("demo", "prune the bundled OPT (SNP, automatic ratios), evaluate dense and pruned, print a summary") { outDir, tau, windows, samples };
        cmd.SetAction(p => run(p, () =>
        {
            string model = Path.Combine(RepoPaths.Root, "models", "opt-tiny-c4");
            string dest = Path.Combine(p.GetValue(outDir)!, "opt-tiny-c4-snp");
            var report = PruneJob.Run(new PruneJobOptions
            {
                ModelDir = model, OutDir = dest, Force = true,
                Prune = new PruneOptions { Ordering = Ordering.Zca, Reconstruct = ReconstructMode.Lstsq, Policy = RatioPolicyKind.Variance, Amount = p.GetValue(tau) },
                CalibSource = TextSources.C4, CalibSamples = p.GetValue(samples), CalibSeqLen = 512,
                EvalDataset = TextSources.WikiText2, EvalSeqLen = 512, EvalMaxWindows = p.GetValue(windows),
            }, Cli.Log);
            string reportPath = Path.Combine(p.GetValue(outDir)!, "demo-report.json");
            AtomicFile.WriteAllText(reportPath, report.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
            var dense = report["eval"]!["dense"]!; var pruned = report["eval"]!["pruned"]!;
            long before = (long)report["params_before"]!, after = (long)report["params_after"]!;
            Console.Error.WriteLine();
            Console.Error.WriteLine($"opt-tiny-c4 pruned with SNP (zca ordering, lstsq reconstruction, variance τ = {p.GetValue(tau)}), WikiText-2 test, {dense["windows"]} windows × 512");
            Console.Error.WriteLine($"  {"",-10} {"parameters",12} {"perplexity",12} {"eval s",8}");
            Console.Error.WriteLine($"  {"dense",-10} {before,12:N0} {(double)dense["perplexity"]!,12:F2} {(double)dense["seconds"]!,8:F1}");
            Console.Error.WriteLine($"  {"pruned",-10} {after,12:N0} {(double)pruned["perplexity"]!,12:F2} {(double)pruned["seconds"]!,8:F1}");
            Console.Error.WriteLine($"  prunable parameters removed: {(double)report["prunable_fraction_removed"]! * 100:F1} %; pruning took {(double)report["seconds"]!["total"]!:F1} s");
            Console.Error.WriteLine($"  pruned checkpoint: {dest}    report: {reportPath}");
            return new JsonObject
            {
                ["report"] = reportPath, ["pruned_model"] = dest,
                ["params_before"] = before, ["params_after"] = after,
                ["ppl_dense"] = dense["perplexity"]!.DeepClone(), ["ppl_pruned"] = pruned["perplexity"]!.DeepClone(),
            };
        }));
        return cmd;
    }
}
