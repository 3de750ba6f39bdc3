using System.CommandLine;
using System.Diagnostics;
using System.Text.Json.Nodes;
using LlmSnp;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Evaluation;
using LlmSnp.Pruning;

/// <summary>
/// `llmsnp demo`: the README's main job. Prunes the bundled trained OPT, LLaMA and ViT with SNP's
/// automatic per-layer ratios, measures dense and pruned in the same run, prints a summary table.
/// </summary>
static class DemoCommand
{
    /// <summary>The bundled language model the demo prunes: the longer-trained one (tools/reference/train_opt_tiny.py).</summary>
    const string OptModelName = "opt-tiny-c4-v2";
    /// <summary>The real pretrained LLaMA-architecture model (grouped-query attention), models/stories260k/PROVENANCE.md.</summary>
    const string LlamaModelName = "stories260k";

    /// <summary>What the demo reads: the bundled models and evaluation data (its --out must not reach them).</summary>
    public static IEnumerable<string> Inputs =>
        new[] { OptModelName, LlamaModelName, "vit-tiny" }.Select(m => Path.Combine(RepoPaths.Root, "models", m)).Append(RepoPaths.EvalData);

    public static Command Build(Func<ParseResult, Func<JsonObject>, int> run)
    {
        var outDir = new Option<string>("--out") { Description = "where pruned checkpoints and the report go", DefaultValueFactory = _ => "out" };
        // ViT-tiny is small and dense: a τ that costs OPT nothing costs it many points, so each model has its own.
        var tauOpt = new Option<double>("--variance-opt") { Description = "τ of the automatic per-layer ratios for the OPT", DefaultValueFactory = _ => 0.95 };
        var tauVit = new Option<double>("--variance-vit") { Description = "τ of the automatic per-layer ratios for the ViT", DefaultValueFactory = _ => 0.99 };
        var tauLlama = new Option<double>("--variance-llama") { Description = "τ of the automatic per-layer ratios for stories260K", DefaultValueFactory = _ => 0.99 };
        var windows = new Option<int?>("--eval-windows") { Description = "WikiText-2 windows of 512 tokens to evaluate (default: all 561)" };
        var images = new Option<int>("--eval-images") { Description = "ImageNet images to evaluate (never the calibration ones)", DefaultValueFactory = _ => 500 };
        var cmd = new Command("demo", "prune the bundled OPT, LLaMA (stories260K) and ViT (SNP, automatic ratios), evaluate dense and pruned, print a summary") { outDir, tauOpt, tauVit, tauLlama, windows, images };
        cmd.SetAction(p => run(p, () =>
        {
            string root = RepoPaths.Root, dest = p.GetValue(outDir)!;
            double tOpt = p.GetValue(tauOpt), tVit = p.GetValue(tauVit), tLlama = p.GetValue(tauLlama);
            PruneOptions Snp(double tau) => new() { Ordering = Ordering.Zca, Reconstruct = ReconstructMode.Lstsq, Policy = RatioPolicyKind.Variance, Amount = tau };
            var sw = Stopwatch.StartNew();
            var opt = PruneJob.Run(new PruneJobOptions
            {
                ModelDir = Path.Combine(root, "models", OptModelName), OutDir = Path.Combine(dest, OptModelName + "-snp"), Force = true, Prune = Snp(tOpt),
                CalibSource = TextSources.C4, CalibSamples = 64, CalibSeqLen = 512,
                EvalDataset = TextSources.WikiText2, EvalSeqLen = 512, EvalLimit = p.GetValue(windows),
            }, Cli.Log);
            double optSeconds = sw.Elapsed.TotalSeconds;
            var llama = PruneJob.Run(new PruneJobOptions
            {
                ModelDir = Path.Combine(root, "models", LlamaModelName), OutDir = Path.Combine(dest, LlamaModelName + "-snp"), Force = true, Prune = Snp(tLlama),
                CalibSource = TextSources.TinyStories, CalibSamples = 128, CalibSeqLen = 512,
                EvalDataset = TextSources.TinyStories, EvalSeqLen = 512,
            }, Cli.Log);
            double llamaSeconds = sw.Elapsed.TotalSeconds - optSeconds;
            string imageDir = Path.Combine(root, "eval", "data", "imagenet-val");
            var vit = PruneJob.Run(new PruneJobOptions
            {
                ModelDir = Path.Combine(root, "models", "vit-tiny"), OutDir = Path.Combine(dest, "vit-tiny-snp"), Force = true, Prune = Snp(tVit),
                CalibSource = imageDir, CalibSamples = 64, EvalDataset = PruneJob.AccuracyEval, EvalImages = imageDir, EvalLimit = p.GetValue(images),
            }, Cli.Log);
            double vitSeconds = sw.Elapsed.TotalSeconds - optSeconds - llamaSeconds;
            var report = new JsonObject { [OptModelName] = opt.ToJson(), [LlamaModelName] = llama.ToJson(), ["vit-tiny"] = vit.ToJson() };
            string reportPath = Path.Combine(dest, "demo-report.json");
            AtomicFile.WriteAllText(reportPath, report.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));

            var e = Console.Error;
            e.WriteLine();
            e.WriteLine("SNP: zca ordering, least-squares reconstruction, automatic per-layer ratios (variance τ)");
            e.WriteLine($"  {"model",-15} {"τ",5} {"metric",-27} {"params before",14} {"params after",13} {"dense",9} {"pruned",9} {"prefill",8} {"decode",7} {"time",6}");
            Row(OptModelName, tOpt, $"WikiText-2 ppl ({opt.Eval!.Samples}×512)", opt, optSeconds);
            Row(LlamaModelName, tLlama, $"TinyStories ppl ({llama.Eval!.Samples}×512)", llama, llamaSeconds);
            Row("vit-tiny", tVit, $"ImageNet top-1 % ({vit.Eval!.Samples} img)", vit, vitSeconds);
            e.WriteLine($"  prefill, decode: pruned speed over dense, LlmSnp's forward (prefill of {512 - InferenceBench.DecodeSteps} tokens, batch-1 decode of {InferenceBench.DecodeSteps}; best of {InferenceBench.Repeats})");
            if (llama.Speed?.LlamaCppPrefillSpeedUp is double cp && llama.Speed.LlamaCppDecodeSpeedUp is double cd)
                e.WriteLine($"  {LlamaModelName} in llama.cpp (exported GGUF): prefill {cp:F2}×, decode {cd:F2}×");
            e.WriteLine($"  pruned checkpoints: {string.Join(", ", new[] { OptModelName, LlamaModelName, "vit-tiny" }.Select(n => Path.Combine(dest, n + "-snp")))}");
            e.WriteLine($"  full report: {reportPath}");
            return new JsonObject
            {
                ["report"] = reportPath,
                [OptModelName] = Summary(opt), [LlamaModelName] = Summary(llama), ["vit-tiny"] = Summary(vit), ["seconds"] = sw.Elapsed.TotalSeconds,
            };

            void Row(string name, double tau, string metric, PruneOutcome r, double seconds) =>
                e.WriteLine($"  {name,-15} {tau,5} {metric,-27} {r.ParamsBefore,14:N0} {r.ParamsAfter,13:N0} {r.Eval!.Dense,9:F2} {r.Eval.Pruned,9:F2} " +
                    $"{(r.Speed is { } s ? $"{s.PrefillSpeedUp:F2}×" : "—"),8} {(r.Speed is { } t ? $"{t.DecodeSpeedUp:F2}×" : "—"),7} {seconds,5:F0}s");
        }));
        return cmd;
    }

    static JsonObject Summary(PruneOutcome r) => new()
    {
        ["params_before"] = r.ParamsBefore, ["params_after"] = r.ParamsAfter, ["prunable_fraction_removed"] = r.PrunableFractionRemoved,
        ["dense"] = r.Eval!.Dense, ["pruned"] = r.Eval.Pruned,
        ["prefill_speedup"] = r.Speed?.PrefillSpeedUp, ["decode_speedup"] = r.Speed?.DecodeSpeedUp,
        ["llama_cpp_prefill_speedup"] = r.Speed?.LlamaCppPrefillSpeedUp, ["llama_cpp_decode_speedup"] = r.Speed?.LlamaCppDecodeSpeedUp,
    };
}
