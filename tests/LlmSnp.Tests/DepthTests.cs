using System.Text.Json.Nodes;
using LlmSnp.Models;
using LlmSnp.Pruning;
using LlmSnp.Pruning.Depth;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Tests;

/// <summary>
/// Depth pruning (`prune --drop-blocks`): the criteria against a plain forward computed here, the least-squares
/// replacement against a direct float64 solve, renumbered checkpoints and config lists, reloads whose logits equal a
/// forward that skips the blocks (or applies the fitted map), and bad options.
/// </summary>
public class DepthTests
{
    static JsonObject Json(string path) => JsonNode.Parse(File.ReadAllText(path))!.AsObject();

    /// <summary>Random token ids [batches × 1 × tokens] (or pixels for an image model) as calibration micro-batches.</summary>
    static List<Tensor> Inputs(IPrunableModel m, int batches, int tokens, int seed)
    {
        var gen = new torch.Generator((ulong)seed);
        return Enumerable.Range(0, batches).Select(_ => m is IImageClassifier ic
            ? torch.randn(new long[] { 2, ic.Channels, ic.ImageSize, ic.ImageSize }, generator: gen)
            : torch.randint(0, ((ILanguageModel)m).VocabSize, new long[] { 2, tokens }, generator: gen)).ToList();
    }

    static JsonObject Write(IPrunableModel m, DepthPlan plan, IReadOnlyList<Tensor> calib, string outDir) =>
        PrunedCheckpoint.Write(new PrunedCheckpoint.Request
        {
            Model = m, Options = new PruneOptions(), Calibration = calib, CalibrationInfo = new JsonObject(),
            OutDir = outDir, SourceDir = m.ModelDir, ParamsBefore = m.ParameterCount(), Depth = plan, PruneWidth = false,
        });

    /// <summary>The stream at every block boundary, h_0 … h_L, from the plain block forward.</summary>
    static List<Tensor> Boundaries(IPrunableModel m, Tensor input)
    {
        var hs = new List<Tensor> { m.Embed(input).to(ScalarType.Float64) };
        var h = m.Embed(input);
        for (int i = 0; i < m.BlockCount; i++)
        {
            using var b = m.LoadBlock(i);
            var next = b.Forward(h)!;
            h.Dispose();
            h = next;
            hs.Add(h.to(ScalarType.Float64));
        }
        h.Dispose();
        return hs;
    }

    static double MeanCos(IEnumerable<(Tensor A, Tensor B)> pairs, bool angular)
    {
        double sum = 0; long n = 0;
        foreach (var (a, b) in pairs)
        {
            // cos = a·b / (‖a‖‖b‖) per token, written out.
            var cos = (a * b).sum(-1) / (a.square().sum(-1).sqrt() * b.square().sum(-1).sqrt());
            var v = angular ? cos.clamp(-1, 1).arccos() / Math.PI : cos;
            sum += v.sum().item<double>(); n += v.numel();
        }
        return sum / n;
    }

    [Fact]
    public void Influence_and_angular_scores_equal_cosines_of_a_plain_forward()
    {
        using var tmp = new TempDir();
        string dir = new TinyLlama { Layers = 4 }.Write(tmp.Sub("m"));
        using var m = ModelFamilies.Open(dir, CPU, ScalarType.Float64);
        var calib = Inputs(m, 3, 12, 7);
        var hs = calib.Select(x => Boundaries(m, x)).ToList();
        using (var plan = DepthScan.Plan(m, calib, new DepthOptions { Count = 1, Criterion = DepthCriterion.Influence }, null))
        {
            Assert.Equal(4, plan.Scores.Count);
            for (int i = 0; i < 4; i++)
                Assert.Equal(1 - MeanCos(hs.Select(h => (h[i], h[i + 1])), false), plan.Scores[i].Score, 1e-10);
            int lowest = plan.Scores.OrderBy(s => s.Score).First().Start;
            Assert.Equal(new[] { lowest }, plan.Removed);
        }
        using (var plan = DepthScan.Plan(m, calib, new DepthOptions { Count = 2, Criterion = DepthCriterion.Angular }, null))
        {
            Assert.Equal(3, plan.Scores.Count);   // spans [0,2), [1,3), [2,4)
            for (int i = 0; i < 3; i++)
            {
                Assert.Equal(2, plan.Scores[i].Length);
                Assert.Equal(MeanCos(hs.Select(h => (h[i], h[i + 2])), true), plan.Scores[i].Score, 1e-10);
            }
            int best = plan.Scores.OrderBy(s => s.Score).First().Start;
            Assert.Equal(new[] { best, best + 1 }, plan.Removed);
        }
        hs.ForEach(l => l.ForEach(t => t.Dispose()));
    }

    /// <summary>The MLP output x of a block (u the stream entering its MLP sub-block) through the block's own node-layer steps.</summary>
    static (Tensor U, Tensor X) MlpOutput(IPrunableBlock b, Tensor h)
    {
        var u = b.Advance(0, h);
        var (w, c) = b.Consumer(1);
        return (u, F.linear(b.Activations(1, u), w, c));
    }

    /// <summary>
    /// min ‖[1 x]·B − Δ‖² + λ‖M‖² solved directly: the ridge rows stacked under the design matrix, torch.linalg.lstsq.
    /// </summary>
    static (Tensor M, Tensor T, double Rel) DirectSolve(Tensor x, Tensor delta, Tensor end, double lambda)
    {
        long d = x.shape[1];
        var a = torch.cat(new[] { torch.ones(x.shape[0], 1, ScalarType.Float64), x }, 1);
        var ridge = torch.cat(new[] { torch.zeros(d, 1, ScalarType.Float64), Math.Sqrt(lambda) * torch.eye(d, dtype: ScalarType.Float64) }, 1);
        var sol = torch.linalg.lstsq(torch.cat(new[] { a, ridge }, 0), torch.cat(new[] { delta, torch.zeros(d, d, ScalarType.Float64) }, 0)).Solution;
        var resid = (a.matmul(sol) - delta).square().sum().item<double>();
        var variance = (end - end.mean(new long[] { 0 }, keepdim: true)).square().sum().item<double>();
        return (sol.narrow(0, 1, d), sol[0], resid / variance);
    }

    [Theory]
    [InlineData(0.0)]
    [InlineData(0.01)]
    public void Lstsq_replacement_equals_a_direct_float64_least_squares_solve(double damp)
    {
        using var tmp = new TempDir();
        string dir = new TinyLlama { Layers = 4, Hidden = 16, Heads = 2, KvHeads = 1 }.Write(tmp.Sub("m"));
        using var m = ModelFamilies.Open(dir, CPU, ScalarType.Float64);
        var calib = Inputs(m, 3, 20, 11);   // 120 rows for 17 unknowns per output
        // Span [2, 4) replaced, fitted into block 1's MLP: x of block 1, Δ = h_4 − h_2, collected here.
        var xs = new List<Tensor>(); var deltas = new List<Tensor>(); var ends = new List<Tensor>();
        foreach (var input in calib)
        {
            var hs = Boundaries(m, input);
            using var b1 = m.LoadBlock(1);
            xs.Add(MlpOutput(b1, hs[1]).X.reshape(-1, 16));
            deltas.Add((hs[4] - hs[2]).reshape(-1, 16));
            ends.Add(hs[4].reshape(-1, 16));
        }
        var x = torch.cat(xs, 0); var delta = torch.cat(deltas, 0); var end = torch.cat(ends, 0);
        double lambda = damp * x.square().sum(new long[] { 0 }).mean().item<double>();   // SNP's damping: damp × mean diagonal of the Gram over x
        var (mWant, tWant, relWant) = DirectSolve(x, delta, end, lambda);

        using var plan = DepthScan.Plan(m, calib, new DepthOptions { Named = new[] { 2, 3 }, Replace = DepthReplace.Lstsq, Damp = damp }, null);
        var span = Assert.Single(plan.Spans);
        Assert.Equal((2, 4, 1), (span.Start, span.End, span.Target));
        Assert.Equal(lambda, span.Lambda, 1e-9 * Math.Max(1, lambda));
        Assert.True((span.M - mWant).abs().max().item<double>() < 1e-8, "M differs from the direct solve");
        Assert.True((span.T! - tWant).abs().max().item<double>() < 1e-8, "t differs from the direct solve");
        Assert.Equal(relWant, span.RelativeError, 1e-8);
        Assert.Equal(delta.square().sum().item<double>() / (end - end.mean(new long[] { 0 }, keepdim: true)).square().sum().item<double>(), span.DropRelativeError, 1e-10);
        Assert.True(span.RelativeError < span.DropRelativeError);

        // The written checkpoint: block 1's down_proj carries the fold, and its forward equals x → x + x·M + t applied here.
        string outDir = tmp.Sub("out");
        var report = Write(m, plan, calib, outDir);
        Assert.Equal(new[] { 2, 3 }, report["depth"]!["removed_blocks"]!.AsArray().Select(n => (int)n!));
        using var pruned = ModelFamilies.Open(outDir, CPU, ScalarType.Float64);
        Assert.Equal(2, pruned.BlockCount);
        using var probe = torch.randint(0, 96, new long[] { 1, 9 }, generator: new torch.Generator(5));
        using var scope = NewDisposeScope();
        var h = m.Embed(probe);
        using (var b0 = m.LoadBlock(0)) h = b0.Forward(h)!;
        using (var b1 = m.LoadBlock(1))
        {
            var (u, xo) = MlpOutput(b1, h);
            h = u + xo + xo.matmul(mWant) + tWant;
        }
        var want = m.Head(h);
        var got = LlamaTests.Forward(pruned, probe);
        // The folded down_proj is stored in the checkpoint's float32: that rounding is the only difference.
        Assert.True((got - want).abs().max().item<double>() < 1e-6, $"max |Δlogit| {(got - want).abs().max().item<double>():G3}");
        var dropped = m.Head(SpanDropped(m, probe));
        Assert.True((dropped - want).abs().max().item<double>() > 1e-3, "the replacement changes nothing");
    }

    /// <summary>Blocks 0, 1 of the source, then the head's input: the span dropped with no replacement.</summary>
    static Tensor SpanDropped(IPrunableModel m, Tensor ids)
    {
        var h = m.Embed(ids);
        for (int i = 0; i < 2; i++) using (var b = m.LoadBlock(i)) h = b.Forward(h)!;
        return h;
    }

    /// <summary>A span that adds a constant (attention and MLP weights zero, biases kept) is replaced with ~zero error.</summary>
    [Fact]
    public void A_span_that_adds_a_constant_is_replaced_exactly()
    {
        using var tmp = new TempDir();
        string dir = new TinyOpt
        {
            Layers = 4,
            Edit = t => { t["model.decoder.layers.2.self_attn.out_proj.weight"].zero_(); t["model.decoder.layers.2.fc2.weight"].zero_(); },
        }.Write(tmp.Sub("m"));
        using var m = ModelFamilies.Open(dir, CPU, ScalarType.Float64);
        var calib = Inputs(m, 2, 24, 3);
        using var plan = DepthScan.Plan(m, calib, new DepthOptions { Count = 1, Criterion = DepthCriterion.Lstsq, Replace = DepthReplace.Lstsq, Damp = 0 }, null);
        Assert.Equal(new[] { 2 }, plan.Removed);   // the one span the lstsq criterion finds exactly replaceable
        var span = Assert.Single(plan.Spans);
        Assert.True(span.RelativeError < 1e-12, $"relative error {span.RelativeError:G3}");
        Assert.True(span.DropRelativeError > 1e-4);
        Assert.True(plan.Scores.Single(s => s.Start == 2).Score < 1e-12);
        Assert.True(plan.Scores.Where(s => s.Start != 2).All(s => s.Score > 1e-6));
    }

    public static readonly TheoryData<string, string> SkipFamilies = new()
    {
        { "opt", "1," }, { "llama", "0,2" }, { "vit", "1," }, { "gemma2", "0," }, { "qwen3", "1," },
    };

    /// <summary>
    /// Every family: the blocks removed, the rest renumbered (tensor names, num_hidden_layers, per-layer lists and
    /// attention kinds), and the reloaded checkpoint computes exactly the source with those blocks skipped.
    /// </summary>
    [Theory]
    [MemberData(nameof(SkipFamilies))]
    public void Dropped_blocks_reload_as_the_source_forward_that_skips_them(string family, string drop)
    {
        using var tmp = new TempDir();
        string dir = family switch
        {
            "opt" => new TinyOpt { Layers = 3 }.Write(tmp.Sub("m")),
            "llama" => new TinyLlama { Layers = 3 }.Write(tmp.Sub("m")),
            "vit" => new TinyVit { EditConfig = c => c["num_hidden_layers"] = 2 }.Write(tmp.Sub("m")),
            _ => FamilyPruningTests.WithTokenizer(tmp, family == "gemma2" ? "gemma2" : "qwen3"),
        };
        using var m = ModelFamilies.Open(dir, CPU, ScalarType.Float64);
        var calib = Inputs(m, 2, 8, 1);
        var options = DepthOptions.Parse(drop, null, null, 0.01);
        options.CheckAgainst(m.BlockCount);
        using var plan = DepthScan.Plan(m, calib, options, null);
        var kept = Enumerable.Range(0, m.BlockCount).Except(options.Named!).ToArray();
        Assert.Equal(kept, plan.Kept);
        string outDir = tmp.Sub("out");
        Write(m, plan, calib, outDir);

        var src = Json(Path.Combine(dir, "config.json"));
        var cfg = Json(Path.Combine(outDir, "config.json"));
        Assert.Equal(kept.Length, (int)cfg["num_hidden_layers"]!);
        if (m.LayerTypes is { } types)
            Assert.Equal(kept.Select(i => types[i]), cfg["layer_types"]!.AsArray().Select(n => (string)n!));
        using (var ck = new LlmSnp.Checkpoint.CheckpointReader(outDir))
        using (var srcCk = new LlmSnp.Checkpoint.CheckpointReader(dir))
            for (int k = 0; k < kept.Length; k++)
            {
                // Layer k of the output is source layer kept[k], tensor for tensor.
                var names = srcCk.Names.Where(n => n.Split('.').FirstOrDefault(p => p.All(char.IsAsciiDigit)) == kept[k].ToString()).ToArray();
                Assert.NotEmpty(names);
                foreach (var n in names)
                {
                    string renamed = LayerRenumbering.RenameOne(n, kept[k], k);
                    using var a = srcCk.ReadShaped(n, ScalarType.Float64, CPU, srcCk.Entry(n).Shape);
                    using var b = ck.ReadShaped(renamed, ScalarType.Float64, CPU, ck.Entry(renamed).Shape);
                    Assert.True((a - b).abs().max().item<double>() == 0, $"{renamed} differs from {n}");
                }
            }
        using var pruned = ModelFamilies.Open(outDir, CPU, ScalarType.Float64);
        Assert.Equal(kept.Length, pruned.BlockCount);
        foreach (var input in Inputs(m, 1, 10, 9))
        {
            using var scope = NewDisposeScope();
            var h = m.Embed(input);
            foreach (var i in kept) using (var b = m.LoadBlock(i)) h = b.Forward(h)!;
            var want = m.Head(h);
            var h2 = pruned.Embed(input);
            for (int k = 0; k < pruned.BlockCount; k++) using (var b = pruned.LoadBlock(k)) h2 = b.Forward(h2)!;
            var got = pruned.Head(h2);
            Assert.True((got - want).abs().max().item<double>() < 1e-10, $"{family}: max |Δlogit| {(got - want).abs().max().item<double>():G3}");
        }
        _ = src;
    }

    /// <summary>
    /// stories260K without its block 2, replaced by least squares (the fold gives down_proj a bias, so every layer has
    /// one): export gguf writes 4 layers that llama.cpp runs at LlmSnp's perplexity of the same checkpoint.
    /// </summary>
    [Fact]
    public void Depth_pruned_llama_exports_to_gguf_and_llama_cpp_matches()
    {
        using var tmp = new TempDir();
        string stories = Path.Combine(Repo.Root, "models", "stories260k");
        using var m = ModelFamilies.Open(stories);
        var calib = Inputs(m, 2, 64, 4);
        using var plan = DepthScan.Plan(m, calib, DepthOptions.Parse("2,", null, "lstsq", 0.01), null);
        string outDir = tmp.Sub("out");
        Write(m, plan, calib, outDir);
        var cfg = Json(Path.Combine(outDir, "config.json"));
        Assert.Equal(4, (int)cfg["num_hidden_layers"]!);
        Assert.True((bool)cfg["mlp_bias"]!);
        string gguf = tmp.Sub("m.gguf");
        LlmSnp.Export.GgufExport.Run(outDir, gguf, LlmSnp.Export.GgufDType.F32);
        var ids = System.Text.Json.JsonSerializer.Deserialize<int[]>(File.ReadAllBytes(Path.Combine(Repo.Root, "eval", "data", "tinystories", "eval.ids.json")))!;
        using var pruned = ModelFamilies.OpenLanguageModel(outDir);
        var ours = LlmSnp.Evaluation.Perplexity.Evaluate(pruned, ids, 256, 3, "tinystories");
        using var rt = LlmSnp.Evaluation.LlamaCppRuntime.Load(gguf, 256, threads: 1, f32Attention: true);
        Assert.Equal("4", rt.Metadata["llama.block_count"]);
        var theirs = rt.Perplexity(ids, 256, 3);
        Assert.True(Math.Abs(theirs.Perplexity / ours.Perplexity - 1) < 1e-4, $"llama.cpp {theirs.Perplexity} vs LlmSnp {ours.Perplexity}");
    }

    [Fact]
    public void Renumbering_filters_per_layer_lists_and_states_pattern_derived_kinds()
    {
        Assert.Equal("model.layers.1.mlp.experts.7.down_proj.weight", LayerRenumbering.RenameOne("model.layers.4.mlp.experts.7.down_proj.weight", 4, 1));
        Assert.Equal("vit.encoder.layer.0.output.dense.bias", LayerRenumbering.RenameOne("vit.encoder.layer.3.output.dense.bias", 3, 0));
        Assert.Throws<InvalidOperationException>(() => LayerRenumbering.RenameOne("model.layers.5.mlp.down_proj.weight", 4, 1));
        var cfg = new JsonObject
        {
            ["num_hidden_layers"] = 5,
            ["intermediate_sizes"] = new JsonArray(10, 11, 12, 13, 14),
            ["ffn_dims"] = new JsonArray(20, 21, 22, 23, 24),
            ["num_heads_per_layer"] = new JsonArray(4, 4, 2),   // written for the kept blocks already: left as is
            ["mlp_only_layers"] = new JsonArray(1),
            ["decoder_sparse_step"] = 2,
        };
        var types = new[] { "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention" };
        LayerRenumbering.Config(cfg, new[] { 0, 3, 4 }, 5, types);
        Assert.Equal(3, (int)cfg["num_hidden_layers"]!);
        Assert.Equal(new[] { 10, 13, 14 }, cfg["intermediate_sizes"]!.AsArray().Select(n => (int)n!));
        Assert.Equal(new[] { 20, 23, 24 }, cfg["ffn_dims"]!.AsArray().Select(n => (int)n!));
        Assert.Equal(new[] { 4, 4, 2 }, cfg["num_heads_per_layer"]!.AsArray().Select(n => (int)n!));
        Assert.Equal(new[] { "sliding_attention", "full_attention", "sliding_attention" }, cfg["layer_types"]!.AsArray().Select(n => (string)n!));
        // Sparse where (i + 1) % 2 == 0 and not listed: original 1 (listed) and 3 → kept 3 only, now layer 1.
        Assert.Equal(new[] { 0, 2 }, cfg["mlp_only_layers"]!.AsArray().Select(n => (int)n!));
        Assert.Equal(1, (int)cfg["decoder_sparse_step"]!);
    }

    public static readonly TheoryData<string[], string> BadOptions = new()
    {
        { new[] { "--drop-blocks", "0" }, "--drop-blocks: 0 blocks" },
        { new[] { "--drop-blocks", "3" }, "--drop-blocks: removing 3 of the model's 3 blocks" },
        { new[] { "--drop-blocks", "0,1,2" }, "--drop-blocks: removing 3 of the model's 3 blocks" },
        { new[] { "--drop-blocks", "1,5" }, "--drop-blocks: block 5 is out of range" },
        { new[] { "--drop-blocks", "1,1" }, "--drop-blocks: block 1 is named twice" },
        { new[] { "--drop-blocks", "x" }, "--drop-blocks: 'x' is not" },
        { new[] { "--drop-blocks", "0,", "--depth-replace", "lstsq" }, "--drop-blocks: block 0 has no preceding block" },
        { new[] { "--drop-blocks", "1", "--depth-criterion", "cosine" }, "--depth-criterion: unknown criterion 'cosine'" },
        { new[] { "--depth-replace", "lstsq" }, "--depth-replace needs --drop-blocks" },
        { new[] { "--drop-blocks", "1", "--export-padded" }, "--export-padded with --drop-blocks" },
        { new[] { "--drop-blocks", "1,", "--depth-replace", "lstsq", "--post-ln" }, "the MLP's output does not enter the residual stream unchanged" },
    };

    [Theory]
    [MemberData(nameof(BadOptions))]
    public void Bad_depth_options_fail_with_one_line_and_write_nothing(string[] options, string message)
    {
        using var tmp = new TempDir();
        bool postLn = options.Contains("--post-ln");
        // Calibration text reaches the full OPT vocabulary only where the fold is checked (after the scores).
        string dir = new TinyOpt { Layers = 3, PreLayerNorm = !postLn, Vocab = postLn ? 50272 : 96 }.Write(tmp.Sub("m"));
        string before = string.Join(",", Directory.GetFiles(dir).Select(f => f + new FileInfo(f).Length + File.GetLastWriteTimeUtc(f).Ticks));
        var args = new[] { "prune", "--model", dir, "--out", tmp.Sub("out"), "--calib", "tinystories", "--calib-samples", "2", "--calib-seqlen", "16" }
            .Concat(options.Where(o => o != "--post-ln")).ToArray();
        var r = CliHarness.Run(args);
        Assert.True(r.ExitCode == 1, r.ToString());
        // One error line, the last (progress lines of the calibration may precede it).
        var line = Assert.Single(r.StderrLines, l => l.StartsWith("error"));
        Assert.Equal(line, r.StderrLines[^1]);
        Assert.Contains(message, line);
        Assert.False(Directory.Exists(tmp.Sub("out")), "an output was written");
        Assert.Equal(new[] { "m" }, Directory.GetDirectories(tmp.Path).Select(Path.GetFileName));
        Assert.Equal(before, string.Join(",", Directory.GetFiles(dir).Select(f => f + new FileInfo(f).Length + File.GetLastWriteTimeUtc(f).Ticks)));
    }
}
