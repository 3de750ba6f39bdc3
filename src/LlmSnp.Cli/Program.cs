using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Evaluation;
using LlmSnp.Models;
using LlmSnp.Pruning;

// The CLI only parses options, calls the library and prints: JSON results on stdout (and --json FILE),
// progress and errors on stderr, one line per error, never a stack trace.
Runtime.ConfigureHostMemory();   // before any tensor op: libtorch reads its allocator settings once
Runtime.ConfigureThreads();
LlmSnp.Models.ModelFamilies.Warn = Cli.Log;   // unused stored tensors: one warning line on stderr
using var signals = Signals.Install();
return OptionChecks.Invoke(Cli.Build(), args);

static class Cli
{
    static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    static Option<string> ModelOption() => new("--model") { Description = "checkpoint directory in HF layout", Required = true };
    static readonly Option<string> Device = new("--device") { Description = "cpu or cuda", DefaultValueFactory = _ => "cpu" };
    static readonly Option<string?> DType = new("--dtype") { Description = "compute dtype: float32 (default), bfloat16, float64" };
    static readonly Option<string?> Json = new("--json") { Description = "also write the JSON result to this file" };

    public static RootCommand Build()
    {
        var root = new RootCommand("llmsnp: one-shot structured pruning of transformer checkpoints with Subspace Node Pruning");
        root.Subcommands.Add(EvalCommand());
        root.Subcommands.Add(TokenizeCommand());
        root.Subcommands.Add(InspectCommand());
        root.Subcommands.Add(PruneCommand());
        root.Subcommands.Add(DemoCommand.Build(Run));
        root.Subcommands.Add(ConvertCommand());
        root.Subcommands.Add(CompareCommand());
        root.Subcommands.Add(BenchCommand());
        root.Subcommands.Add(ExportCommand());
        root.Subcommands.Add(GenerateCommand.Build());
        return root;
    }

    /// <summary>`export gguf`: a LLaMA-family checkpoint (dense or pruned) as a GGUF file for llama.cpp.</summary>
    static Command ExportCommand()
    {
        var model = ModelOption();
        var outFile = new Option<string>("--out") { Description = "GGUF file to write (atomically)", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "f32 or f16 for the 2-D weights (norms and biases stay f32)", DefaultValueFactory = _ => "f16" };
        var gguf = new Command("gguf", "write a llama/mistral/qwen2 checkpoint as GGUF (arch llama, or deci when layer widths differ)") { model, outFile, dtype, Json };
        gguf.SetAction(p => Run(p, () => LlmSnp.Export.GgufExport.Run(p.GetValue(model)!, p.GetValue(outFile)!, LlmSnp.Export.GgufExport.ParseDType(p.GetValue(dtype)!)).ToJson()));
        return new Command("export", "write a checkpoint in another tool's format") { gguf };
    }

    static Command EvalCommand()
    {
        var model = ModelOption();
        var dataset = new Option<string>("--dataset") { Description = "wikitext2, c4 (bundled sample), tinystories (bundled eval part) or a file (.json rows, .jsonl docs, text)", DefaultValueFactory = _ => "wikitext2" };
        var seqlen = new Option<int?>("--seqlen") { Description = "window length (default: 2048 or the model's max positions)" };
        var maxWindows = new Option<int?>("--max-windows") { Description = "evaluate only the first N windows" };
        var ppl = new Command("ppl", "perplexity with the published protocol (non-overlapping windows, tail dropped)") { model, dataset, seqlen, maxWindows, Device, DType, Json };
        ppl.SetAction(p => Run(p, () => PerplexityJob.Run(p.GetValue(model)!, p.GetValue(dataset)!, p.GetValue(seqlen), p.GetValue(maxWindows),
            Runtime.ParseDevice(p.GetValue(Device)!), ComputeDType(p), Log).ToJson()));
        var amodel = ModelOption();
        var imagesDir = new Option<string>("--images") { Description = "folder with labels.tsv (file TAB class [TAB synset]); images in it or in images/", Required = true };
        var limit = new Option<int?>("--limit") { Description = "evaluate the first N images" };
        var batch = new Option<int>("--batch") { Description = "images per forward batch", DefaultValueFactory = _ => 32 };
        var acc = new Command("accuracy", "top-1 / top-5 of an image classifier") { amodel, imagesDir, limit, batch, Device, DType, Json };
        acc.SetAction(p => Run(p, () => AccuracyJob.Run(p.GetValue(amodel)!, p.GetValue(imagesDir)!, p.GetValue(limit), p.GetValue(batch),
            Runtime.ParseDevice(p.GetValue(Device)!), ComputeDType(p), Log).ToJson()));
        var lmodel = ModelOption();
        var ids = new Option<string?>("--ids") { Description = "comma-separated token ids (language models); image models use a fixed pattern image" };
        var logits = new Command("logits", "float64 logits for one fixed input, for comparison with another runtime (tools/reference/stock_load_check.py)") { lmodel, ids, Device, DType, Json };
        logits.SetAction(p => Run(p, () => LogitsDump.Run(p.GetValue(lmodel)!,
            p.GetValue(ids)?.Split(',').Select(x => long.TryParse(x.Trim(), out var v) && v >= 0 ? v : throw new LlmSnpException($"--ids: '{x}' is not a token id")).ToList(),
            Runtime.ParseDevice(p.GetValue(Device)!), ComputeDType(p))));
        return new Command("eval", "evaluate a checkpoint") { ppl, acc, logits };
    }

    static Command TokenizeCommand()
    {
        var model = new Option<string?>("--model") { Description = "model directory whose tokenizer to use: vocab.json + merges.txt, tokenizer.model or tokenizer.json (default: the bundled OPT tokenizer)" };
        var text = new Option<string?>("--text") { Description = "text to encode" };
        var file = new Option<string?>("--file") { Description = "file to encode" };
        var rows = new Option<bool>("--rows-json") { Description = "the file is a JSON array of rows, joined with \"\\n\\n\"" };
        var jsonl = new Option<bool>("--jsonl") { Description = "the file is JSON lines of {\"text\": ...}; one id array per document (a training corpus)" };
        // Without --model: the bundled OPT tokenizer, said so in the help; with it: the model's own, or an error.
        static ITextTokenizer Tokenizer(string? modelDir) => modelDir == null ? OptTokenizer.Bundled() : TextTokenizers.ForModel(modelDir);
        var cmd = new Command("tokenize", "encode text with a model's tokenizer (default: the bundled OPT tokenizer), bos prepended as the model does") { model, text, file, rows, jsonl, Json };
        cmd.SetAction(p => Run(p, () =>
        {
            string? t = p.GetValue(text), f = p.GetValue(file);
            if ((t == null) == (f == null)) throw new LlmSnpException("tokenize: give exactly one of --text or --file");
            if (p.GetValue(jsonl))
            {
                if (f == null) throw new LlmSnpException("tokenize: --jsonl needs --file");
                if (!File.Exists(f)) throw new LlmSnpException($"{f}: file not found");
                var tok = Tokenizer(p.GetValue(model));
                var docs = TextSources.ReadJsonl(f).Select(d => tok.Encode(d)).ToList();
                return new JsonObject
                {
                    ["documents"] = docs.Count, ["count"] = docs.Sum(d => d.Length),
                    ["ids"] = new JsonArray(docs.Select(d => (JsonNode)new JsonArray(d.Select(i => (JsonNode)i).ToArray())).ToArray()),
                };
            }
            string input = t ?? (p.GetValue(rows) ? string.Join("\n\n", TextSources.ReadRows(f!))
                : File.Exists(f) ? File.ReadAllText(f!) : throw new LlmSnpException($"{f}: file not found"));
            var ids = Tokenizer(p.GetValue(model)).Encode(input);
            return new JsonObject { ["count"] = ids.Length, ["ids"] = new JsonArray(ids.Select(i => (JsonNode)i).ToArray()) };
        }));
        return cmd;
    }

    static Command InspectCommand()
    {
        var model = ModelOption();
        var cmd = new Command("inspect", "family, dtype, parameter count and per-layer dims of a checkpoint") { model, Json };
        cmd.SetAction(p => Run(p, () => ModelInfo.Inspect(p.GetValue(model)!)));
        return cmd;
    }

    static Command CompareCommand()
    {
        var model = ModelOption();
        var outDir = new Option<string>("--out") { Description = "directory for comparison.json, .csv and the PNG plots", Required = true };
        var ratios = new Option<string>("--ratios") { Description = "comma-separated fractions removed", DefaultValueFactory = _ => "0,0.1,0.2,0.3,0.4,0.5" };
        var methods = new Option<string?>("--methods") { Description = "comma-separated ordering[:reconstruct[:ratio|variance]] (default: SNP zca, zca-precision, obs, id with lstsq; zca with the variance policy; fluctuation:bias; wanda-sp, magnitude, random with none)" };
        var targets = new Option<string>("--targets") { Description = "target sets separated by ';', e.g. \"mlp;heads;mlp,heads\"", DefaultValueFactory = _ => "mlp;heads;mlp,heads" };
        var calib = new Option<string>("--calib") { DefaultValueFactory = _ => "c4", Description = "calibration text" };
        var samples = new Option<int>("--calib-samples") { DefaultValueFactory = _ => 32, Description = "calibration windows" };
        var calibLen = new Option<int?>("--calib-seqlen") { Description = "calibration window length" };
        var eval = new Option<string>("--eval") { DefaultValueFactory = _ => "wikitext2", Description = "evaluation text" };
        var evalLen = new Option<int?>("--eval-seqlen") { Description = "evaluation window length" };
        var evalWindows = new Option<int?>("--eval-limit", "--eval-max-windows") { Description = "evaluate the first N windows (text) or images" };
        var seed = new Option<int>("--seed") { DefaultValueFactory = _ => 0, Description = "seed" };
        var images = new Option<string?>("--images") { Description = "image models: labelled image folder; --calib-samples images calibrate, the others are evaluated" };
        var widthMultiple = PruneCliOptions.WidthMultipleOption();
        var noSpeed = new Option<bool>("--no-speed") { Description = "language models: skip measuring each pruned model's prefill and decode speed against dense" };
        var cmd = new Command("compare", "every method at every ratio on one calibration set: JSON, CSV and plots") { model, outDir, ratios, methods, targets, calib, samples, calibLen, eval, evalLen, evalWindows, seed, images, widthMultiple, noSpeed, Json };
        cmd.SetAction(p => Run(p, () => LlmSnp.Reporting.CompareJob.Run(new LlmSnp.Reporting.CompareOptions
        {
            ModelDir = p.GetValue(model)!, OutDir = p.GetValue(outDir)!,
            Ratios = p.GetValue(ratios)!.Split(',').Select(r => double.TryParse(r, System.Globalization.CultureInfo.InvariantCulture, out var x) && x >= 0 && x < 1 ? x : throw new LlmSnpException($"--ratios: '{r}' is not a fraction in [0, 1)")).ToList(),
            Methods = p.GetValue(methods) is string m ? m.Split(',').Select(LlmSnp.Reporting.Method.Parse).ToList() : LlmSnp.Reporting.Method.Defaults,
            TargetSets = p.GetValue(targets)!.Split(';', StringSplitOptions.RemoveEmptyEntries).Select(t => t.Split(',').All(x => x is "mlp" or "heads") ? t : throw new LlmSnpException($"--targets: unknown target set '{t}'")).ToList(),
            Calib = p.GetValue(calib)!, CalibSamples = p.GetValue(samples), CalibSeqLen = p.GetValue(calibLen),
            Eval = p.GetValue(eval)!, EvalSeqLen = p.GetValue(evalLen), EvalLimit = p.GetValue(evalWindows), Seed = p.GetValue(seed), Images = p.GetValue(images),
            WidthMultiple = p.GetValue(widthMultiple), MeasureSpeed = !p.GetValue(noSpeed),
            CommandLine = "llmsnp " + string.Join(' ', Environment.GetCommandLineArgs().Skip(1)),
        }, Log)));
        return cmd;
    }

    static Command BenchCommand()
    {
        var shape = new Option<string>("--shape") { Description = "shape: OPT 125m, 350m, 1.3b, 2.7b, 6.7b, 13b; LLaMA llama-7b, llama3-8b (random weights, F16, in a temp dir)", DefaultValueFactory = _ => "125m" };
        var layers = new Option<int?>("--layers") { Description = "override the number of layers (memory-scaling checks)" };
        var windows = new Option<int>("--eval-windows") { Description = "perplexity windows", DefaultValueFactory = _ => 4 };
        var seqlen = new Option<int>("--seqlen") { Description = "window length", DefaultValueFactory = _ => 2048 };
        var samples = new Option<int>("--calib-samples") { Description = "calibration windows for the pruning run", DefaultValueFactory = _ => 32 };
        var skipEval = new Option<bool>("--skip-eval") { Description = "skip LlmSnp's perplexity evaluation (llama.cpp's dense and pruned speed are still measured)" };
        var benchMultiple = PruneCliOptions.WidthMultipleOption();
        var skipPrune = new Option<bool>("--skip-prune") { Description = "only the evaluation (and llama.cpp's dense speed)" };
        var work = new Option<string>("--work-dir") { Description = "where the random checkpoint is generated", DefaultValueFactory = _ => Path.GetTempPath() };
        var ordering = new Option<string>("--ordering") { Description = "ordering of the pruning run (zca; variance skips the eigendecomposition)", DefaultValueFactory = _ => "zca" };
        var cppPrefill = new Option<int>("--llama-cpp-prefill") { Description = "tokens llama.cpp prefills (LLaMA shapes; at most --seqlen)", DefaultValueFactory = _ => 512 };
        var benchRatio = new Option<double>("--ratio") { Description = "fraction of MLP neurons and heads (K/V groups) the pruning run removes", DefaultValueFactory = _ => 0.2 };
        var cmd = new Command("bench", "machine GEMM peak, perplexity throughput and pruning time of a random model of a released shape") { shape, layers, windows, seqlen, samples, skipEval, skipPrune, work, ordering, benchRatio, benchMultiple, cppPrefill, Json };
        var cases = new Option<int>("--cases") { Description = "mutated checkpoints and configs to try", DefaultValueFactory = _ => 20000 };
        var fuzzSeed = new Option<int>("--seed") { Description = "fuzz seed", DefaultValueFactory = _ => 20240611 };
        var fuzz = new Command("fuzz", "hostile-input fuzzing of the safetensors reader, sharded index and config parsing") { cases, fuzzSeed, Json };
        fuzz.SetAction(p => Run(p, () =>
        {
            string dir = Path.Combine(Path.GetTempPath(), $"llmsnp-fuzz-{Guid.NewGuid():N}");
            try { return LlmSnp.Reliability.HeaderFuzzer.Run(p.GetValue(cases), p.GetValue(fuzzSeed), dir, TimeSpan.FromSeconds(10)).ToJson(); }
            finally { if (Directory.Exists(dir)) Directory.Delete(dir, true); }
        }));
        cmd.Subcommands.Add(fuzz);
        cmd.SetAction(p => Run(p, () =>
        {
            var s = LlmSnp.Benchmarks.BenchShapes.Parse(p.GetValue(shape)!);
            if (p.GetValue(layers) is int l) s = s.WithLayers(l);
            return LlmSnp.Benchmarks.Bench.Run(new LlmSnp.Benchmarks.BenchOptions
            {
                Shape = s, EvalWindows = p.GetValue(windows), SeqLen = p.GetValue(seqlen), CalibSamples = p.GetValue(samples),
                SkipEval = p.GetValue(skipEval), WorkDir = p.GetValue(work)!, Ordering = Orderings.Parse(p.GetValue(ordering)!), Ratio = p.GetValue(benchRatio), LlamaCppPrefill = p.GetValue(cppPrefill),
                WidthMultiple = p.GetValue(benchMultiple), SkipPrune = p.GetValue(skipPrune),
            }, Log);
        }));
        return cmd;
    }

    static Command ConvertCommand()
    {
        var model = ModelOption();
        var outDir = new Option<string>("--out") { Description = "output directory", Required = true };
        var to = new Option<string>("--to") { Description = "float32, float16 or bfloat16", Required = true };
        var cmd = new Command("convert", "rewrite a checkpoint's weights in another dtype") { model, outDir, to, Json };
        cmd.SetAction(p => Run(p, () => CheckpointConvert.Run(p.GetValue(model)!, p.GetValue(outDir)!, SafeDTypes.ParseOption(p.GetValue(to)!))));
        return cmd;
    }

    static Command PruneCommand()
    {
        var model = ModelOption();
        var o = new PruneCliOptions();
        var cmd = new Command("prune", "prune a checkpoint with SNP (or a baseline ordering) and write it") { model };
        o.AddTo(cmd);
        cmd.Options.Add(Device); cmd.Options.Add(DType); cmd.Options.Add(Json);
        cmd.SetAction(p => Run(p, () => PruneJob.Run(o.ToJobOptions(p, p.GetValue(model)!, Runtime.ParseDevice(p.GetValue(Device)!), ComputeDType(p)), Log).ToJson()));
        return cmd;
    }

    public static TorchSharp.torch.ScalarType ComputeDType(ParseResult p) =>
        p.GetValue(DType) is string s ? SafeDTypes.ParseOption(s) : TorchSharp.torch.ScalarType.Float32;

    public static void Log(string line) => Console.Error.WriteLine(line);

    /// <summary>Runs a command body: JSON to stdout (and --json FILE), one-line errors, exit codes.</summary>
    public static int Run(ParseResult p, Func<JsonObject> body)
    {
        try
        {
            OptionChecks.CheckDestinations(p);
            var result = body();
            string text = result.ToJsonString(Indented);
            if (p.GetValue(Json) is string path) AtomicFile.WriteAllText(path, text + "\n");
            Console.Out.WriteLine(text);
            return 0;
        }
        catch (Exception e) { return Fail(e); }
    }

    /// <summary>One line on stderr and the exit code: 1 for bad input or I/O, 70 for an internal fault (stack with LLMSNP_DEBUG=1).</summary>
    public static int Fail(Exception e)
    {
        Console.Out.Flush();
        if (e is LlmSnpException or IOException or UnauthorizedAccessException)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return 1;
        }
        Console.Error.WriteLine($"error: internal failure: {e.GetType().Name}: {e.Message.Split('\n')[0]}");
        if (Environment.GetEnvironmentVariable("LLMSNP_DEBUG") == "1") Console.Error.WriteLine(e);
        return 70;
    }
}

/// <summary>The options `prune` (and `demo`) share.</summary>
sealed class PruneCliOptions
{
    public static Option<int> WidthMultipleOption() => new("--width-multiple")
    {
        Description = "every pruned MLP layer keeps a multiple of N neurons (16 lets llama.cpp's fast F16/F32 GEMM run the down_proj on AVX-512 CPUs)",
        DefaultValueFactory = _ => 1,
    };

    readonly Option<string> _out = new("--out") { Description = "output directory (written atomically)", Required = true };
    readonly Option<string> _ordering = new("--ordering") { Description = "zca, zca-precision, id, obs, variance, weight-norm, fluctuation, wanda-sp, magnitude, random", DefaultValueFactory = _ => "zca" };
    readonly Option<string> _reconstruct = new("--reconstruct") { Description = "lstsq (least squares, with the mean term wherever the consumer has a bias or its stock class can hold one; else without), lstsq-nobias, lstsq-bias, bias (means only, FLAP) or none", DefaultValueFactory = _ => "lstsq" };
    readonly Option<double?> _ratio = new("--ratio") { Description = "uniform fraction of units removed per layer" };
    readonly Option<double?> _variance = new("--variance") { Description = "τ: keep the smallest prefix holding this fraction of residual variance (automatic per-layer ratios)" };
    readonly Option<double?> _budget = new("--budget") { Description = "fraction of prunable parameters to remove (τ found by bisection)" };
    readonly Option<bool> _uniform = new("--uniform") { Description = "with --ratio or --budget: the same kept count per node kind in every layer, so the stock config states the pruned widths" };
    readonly Option<string> _targets = new("--targets") { Description = "mlp, heads or mlp,heads", DefaultValueFactory = _ => "mlp,heads" };
    readonly Option<int> _widthMultiple = WidthMultipleOption();
    readonly Option<string> _calib = new("--calib") { Description = "calibration data: c4 (bundled sample), wikitext2, tinystories (bundled calibration part) or a text file; a labelled image folder for image models", DefaultValueFactory = _ => "c4" };
    readonly Option<int> _samples = new("--calib-samples") { Description = "calibration windows (text) or images", DefaultValueFactory = _ => 128 };
    readonly Option<int?> _calibLen = new("--calib-seqlen") { Description = "calibration window length (default: 2048 or max positions)" };
    readonly Option<int> _seed = new("--seed") { Description = "seed for calibration sampling and the random ordering", DefaultValueFactory = _ => 0 };
    readonly Option<double> _damp = new("--damp") { Description = "damping, relative to the mean unit diagonal of G", DefaultValueFactory = _ => 0.01 };
    readonly Option<string?> _eval = new("--eval") { Description = "measure dense and pruned: perplexity on wikitext2, c4, tinystories or a text file; 'accuracy' (with --images) for image models" };
    readonly Option<int?> _evalLen = new("--eval-seqlen") { Description = "evaluation window length" };
    readonly Option<int?> _evalWindows = new("--eval-limit", "--eval-max-windows") { Description = "evaluate only the first N windows (text) or images" };
    readonly Option<string?> _images = new("--images") { Description = "labelled image folder for --eval accuracy (image models)" };
    readonly Option<bool> _padded = new("--export-padded") { Description = "also write a zero-padded copy with the original shapes (OUT/padded) that stock tools load" };
    readonly Option<bool> _force = new("--force") { Description = "replace an existing output directory" };

    public void AddTo(Command c)
    {
        foreach (var o in new Option[] { _out, _ordering, _reconstruct, _ratio, _variance, _budget, _uniform, _widthMultiple, _targets, _calib, _samples, _calibLen, _seed, _damp, _eval, _evalLen, _evalWindows, _images, _padded, _force })
            c.Options.Add(o);
    }

    public PruneJobOptions ToJobOptions(ParseResult p, string modelDir, TorchSharp.torch.Device device, TorchSharp.torch.ScalarType dtype)
    {
        var policies = new (double? Value, RatioPolicyKind Kind)[] { (p.GetValue(_ratio), RatioPolicyKind.Ratio), (p.GetValue(_variance), RatioPolicyKind.Variance), (p.GetValue(_budget), RatioPolicyKind.Budget) }
            .Where(x => x.Value != null).ToList();
        if (policies.Count > 1) throw new LlmSnpException("give only one of --ratio, --variance, --budget");
        var (amount, kind) = policies.Count == 1 ? (policies[0].Value!.Value, policies[0].Kind) : (0.99, RatioPolicyKind.Variance);
        var targets = p.GetValue(_targets)!.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        foreach (var t in targets)
            if (t is not ("mlp" or "heads")) throw new LlmSnpException($"--targets: unknown target '{t}' (mlp, heads)");
        var reconstruct = ReconstructModes.Names.TryGetValue(p.GetValue(_reconstruct)!, out var r) ? r
            : throw new LlmSnpException($"--reconstruct: unknown mode '{p.GetValue(_reconstruct)}' ({string.Join(", ", ReconstructModes.Names.Keys)})");
        return new PruneJobOptions
        {
            ModelDir = modelDir, OutDir = p.GetValue(_out)!,
            Prune = new PruneOptions
            {
                Ordering = Orderings.Parse(p.GetValue(_ordering)!), Reconstruct = reconstruct, Policy = kind, Amount = amount,
                PruneMlp = targets.Contains("mlp"), PruneHeads = targets.Contains("heads"), Damp = p.GetValue(_damp), Seed = p.GetValue(_seed),
                UniformWidths = p.GetValue(_uniform), WidthMultiple = p.GetValue(_widthMultiple),
            },
            CalibSource = p.GetValue(_calib)!, CalibSamples = p.GetValue(_samples), CalibSeqLen = p.GetValue(_calibLen),
            EvalDataset = p.GetValue(_eval), EvalSeqLen = p.GetValue(_evalLen), EvalLimit = p.GetValue(_evalWindows), EvalImages = p.GetValue(_images),
            Force = p.GetValue(_force), ExportPadded = p.GetValue(_padded), Device = device, DType = dtype,
        };
    }
}
