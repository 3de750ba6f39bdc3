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
        var shape = new Option<string>("--shape") { Description = "shape: OPT 125m, 350m, 1.3b, 2.7b, 6.7b, 13b; LLaMA llama-7b, llama3-8b (random weights, F16, in a temp dir); mixture qwen3-30b-a3b (BF16)", DefaultValueFactory = _ => "125m" };
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
        var expertsKeep = new Option<string?>("--experts-keep") { Description = "mixture shapes: experts every layer keeps, a count or a fraction (default 0.5; the run then prunes with --uniform so llama.cpp loads it)" };
        var tasks = new Option<string?>("--tasks") { Description = "instead: zero-shot task throughput (eval tasks) on the random model, e.g. piqa,arc_easy,hellaswag" };
        var limit = new Option<int?>("--limit") { Description = "with --tasks: the first N documents of each task" };
        var cmd = new Command("bench", "machine GEMM peak, perplexity throughput and pruning time of a random model of a released shape")
            { shape, layers, windows, seqlen, samples, skipEval, skipPrune, work, ordering, ratio, widthMultiple, cppPrefill, expertsKeep, tasks, limit, Cli.Json };
        cmd.Subcommands.Add(Fuzz());
        cmd.Subcommands.Add(Experts());
        cmd.SetAction(p => Cli.Run(p, () =>
        {
            var s = BenchShapes.Parse(p.GetValue(shape)!);
            if (p.GetValue(layers) is int l) s = s.WithLayers(l);
            bool mixture = s is MoeShape;
            if (!mixture && p.GetValue(expertsKeep) is not null) throw new LlmSnp.LlmSnpException($"--experts-keep: shape {s.Name} has no experts");
            var experts = mixture ? ExpertOptions.Parse(p.GetValue(expertsKeep) ?? "0.5", "snp", "scale") : null;
            return Bench.Run(new BenchOptions
            {
                Shape = s, EvalWindows = p.GetValue(windows), SeqLen = p.GetValue(seqlen), CalibSamples = p.GetValue(samples),
                SkipEval = p.GetValue(skipEval), WorkDir = p.GetValue(work)!, Ordering = Orderings.Parse(p.GetValue(ordering)!), Ratio = p.GetValue(ratio),
                LlamaCppPrefill = p.GetValue(cppPrefill), WidthMultiple = p.GetValue(widthMultiple), SkipPrune = p.GetValue(skipPrune),
                Experts = experts, UniformWidths = mixture,
                Tasks = p.GetValue(tasks), TaskLimit = p.GetValue(limit),
            }, Cli.Log);
        }));
        return cmd;
    }

    static Command Experts()
    {
        var model = new Option<string?>("--model") { Description = "a mixture checkpoint with its tokenizer (or --shape)" };
        var shape = new Option<string?>("--shape") { Description = "instead of --model: a random BF16 checkpoint of this mixture shape (qwen3-30b-a3b), with --layers" };
        var layers = new Option<int?>("--layers") { Description = "layers of the --shape checkpoint" };
        var keep = new Option<string>("--keep") { Description = "fractions of experts kept, comma-separated", DefaultValueFactory = _ => "0.5,0.75" };
        var samples = new Option<int>("--calib-samples") { Description = "calibration windows (TinyStories calibration part)", DefaultValueFactory = _ => 32 };
        var seqlen = new Option<int>("--seqlen") { Description = "calibration and evaluation window length", DefaultValueFactory = _ => 128 };
        var windows = new Option<int>("--eval-windows") { Description = "held-out TinyStories windows", DefaultValueFactory = _ => 16 };
        var ratio = new Option<double>("--ratio") { Description = "neurons removed inside every expert in the few-token comparison", DefaultValueFactory = _ => 0.25 };
        var cmd = new Command("experts", "expert-removal criteria and folds, and the few-token policy, measured on held-out text against the unpruned mixture")
            { model, shape, layers, keep, samples, seqlen, windows, ratio, Cli.DType, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => ExpertCriteria.Run(new ExpertCriteriaOptions
        {
            ModelDir = p.GetValue(model), Shape = p.GetValue(shape) is string sh ? (p.GetValue(layers) is int l ? BenchShapes.Parse(sh).WithLayers(l) : BenchShapes.Parse(sh)) : null,
            CalibSamples = p.GetValue(samples), SeqLen = p.GetValue(seqlen), EvalWindows = p.GetValue(windows), Ratio = p.GetValue(ratio),
            Keep = p.GetValue(keep)!.Split(',').Select(k => double.TryParse(k, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var x) && x > 0 && x < 1 ? x
                : throw new LlmSnp.LlmSnpException($"--keep: '{k}' is not a fraction in (0, 1)")).ToArray(),
            DType = Cli.ComputeDType(p),
        }, Cli.Log)));
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
