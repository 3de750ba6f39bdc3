using System.CommandLine;
using System.Text.Json.Nodes;
using LlmSnp.Benchmarks;
using LlmSnp.Pruning;
using LlmSnp.Reliability;

/// <summary>`llmsnp bench` (speed and memory at released shapes) and `bench fuzz` (hostile inputs).</summary>
static class BenchCommand
{
    public static Command Build()
    {
        var shape = new Option<string>("--shape") { Description = "shape: OPT 125m, 350m, 1.3b, 2.7b, 6.7b, 13b; LLaMA llama-7b, llama3-8b (random weights, F16, in a temp dir)", DefaultValueFactory = _ => "125m" };
        var layers = new Option<int?>("--layers") { Description = "override the number of layers (memory-scaling checks)" };
        var windows = new Option<int>("--eval-windows") { Description = "perplexity windows", DefaultValueFactory = _ => 4 };
        var seqlen = new Option<int>("--seqlen") { Description = "window length", DefaultValueFactory = _ => 2048 };
        var samples = new Option<int>("--calib-samples") { Description = "calibration windows for the pruning run", DefaultValueFactory = _ => 32 };
        var skipEval = new Option<bool>("--skip-eval") { Description = "skip LlmSnp's perplexity evaluation (llama.cpp's dense and pruned speed are still measured)" };
        var widthMultiple = PruneCliOptions.WidthMultipleOption();
        var skipPrune = new Option<bool>("--skip-prune") { Description = "only the evaluation (and llama.cpp's dense speed)" };
        var work = new Option<string>("--work-dir") { Description = "where the random checkpoint is generated", DefaultValueFactory = _ => Path.GetTempPath() };
        var ordering = new Option<string>("--ordering") { Description = "ordering of the pruning run (zca; variance skips the eigendecomposition)", DefaultValueFactory = _ => "zca" };
        var cppPrefill = new Option<int>("--llama-cpp-prefill") { Description = "tokens llama.cpp prefills (LLaMA shapes; at most --seqlen)", DefaultValueFactory = _ => 512 };
        var ratio = new Option<double>("--ratio") { Description = "fraction of MLP neurons and heads (K/V groups) the pruning run removes", DefaultValueFactory = _ => 0.2 };
        var tasks = new Option<string?>("--tasks") { Description = "instead: zero-shot task throughput (eval tasks) on the random model, e.g. piqa,arc_easy,hellaswag" };
        var limit = new Option<int?>("--limit") { Description = "with --tasks: the first N documents of each task" };
        var cmd = new Command("bench", "machine GEMM peak, perplexity throughput and pruning time of a random model of a released shape")
            { shape, layers, windows, seqlen, samples, skipEval, skipPrune, work, ordering, ratio, widthMultiple, cppPrefill, tasks, limit, Cli.Json };
        cmd.Subcommands.Add(Fuzz());
        cmd.SetAction(p => Cli.Run(p, () =>
        {
            var s = BenchShapes.Parse(p.GetValue(shape)!);
            if (p.GetValue(layers) is int l) s = s.WithLayers(l);
            return Bench.Run(new BenchOptions
            {
                Shape = s, EvalWindows = p.GetValue(windows), SeqLen = p.GetValue(seqlen), CalibSamples = p.GetValue(samples),
                SkipEval = p.GetValue(skipEval), WorkDir = p.GetValue(work)!, Ordering = Orderings.Parse(p.GetValue(ordering)!), Ratio = p.GetValue(ratio),
                LlamaCppPrefill = p.GetValue(cppPrefill), WidthMultiple = p.GetValue(widthMultiple), SkipPrune = p.GetValue(skipPrune),
                Tasks = p.GetValue(tasks), TaskLimit = p.GetValue(limit),
            }, Cli.Log);
        }));
        return cmd;
    }

    static Command Fuzz()
    {
        var cases = new Option<int>("--cases") { Description = "mutated checkpoints and configs to try", DefaultValueFactory = _ => 20000 };
        var seed = new Option<int>("--seed") { Description = "fuzz seed", DefaultValueFactory = _ => 20240611 };
        var cmd = new Command("fuzz", "hostile-input fuzzing of the safetensors reader, sharded index and config parsing") { cases, seed, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => RunFuzz(p.GetValue(cases), p.GetValue(seed))));
        return cmd;
    }

    static JsonObject RunFuzz(int cases, int seed)
    {
        string dir = Path.Combine(Path.GetTempPath(), $"llmsnp-fuzz-{Guid.NewGuid():N}");
        try { return HeaderFuzzer.Run(cases, seed, dir, TimeSpan.FromSeconds(10)).ToJson(); }
        finally { if (Directory.Exists(dir)) Directory.Delete(dir, true); }
    }
}
