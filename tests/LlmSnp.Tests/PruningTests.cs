using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>snp.md §8 invariants on small random OPTs, at block level and end to end.</summary>
public class PruningTests
{
    static readonly Ordering[] Snp = { Ordering.Zca, Ordering.ZcaPrecision, Ordering.Id, Ordering.Obs };

    static Tensor RandomHidden(int seed, int batch = 4, int tokens = 24, int hidden = 32)
    {
        var gen = new torch.Generator((ulong)seed);
        return torch.randn(new long[] { batch, tokens, hidden }, ScalarType.Float64, generator: gen);
    }

    /// <summary>Activations [tokens, units] of node layer j and their augmented Gram.</summary>
    static (Tensor Acts, Tensor Gram) Capture(IPrunableBlock block, int j, Tensor hidden)
    {
        Tensor? acts = null;
        block.Forward(hidden, j, a => acts = a.clone().DetachFromDisposeScope());
        using var acc = new GramAccumulator((int)acts!.shape[1], CPU);
        acc.Add(acts);
        return (acts, acc.Result("test"));
    }

    static OrderingInput Input(IPrunableBlock block, int j, Tensor gram, double damp = 1e-10)
    {
        var (w, c) = block.Consumer(j);
        return new OrderingInput(gram, w, c!, block.ProducerSquaredNorms(j), block.NodeLayers[j].GroupSize, 96, damp, 7, "test");
    }

    static long[] Units(IEnumerable<long> groups, int gs) => groups.SelectMany(g => Enumerable.Range(0, gs).Select(u => g * gs + u)).OrderBy(x => x).ToArray();

    static double RelDiff(Tensor a, Tensor b) => ((a - b).norm() / b.norm()).item<double>();

    [Theory]
    [InlineData(1)]   // MLP: neuron 7 = 2 × neuron 3 (relu(2z) = 2 relu(z): an exact affine combination)
    [InlineData(0)]   // heads: head 3 = copy of head 1
    public void Exactly_redundant_unit_is_ranked_last_and_removed_without_output_change(int layer)
    {
        using var tmp = new TempDir();
        string dir = new TinyOpt
        {
            Edit = t =>
            {
                string l = "model.decoder.layers.0.";
                if (layer == 1)
                {
                    t[l + "fc1.weight"][7] = t[l + "fc1.weight"][3] * 2;
                    t[l + "fc1.bias"][7] = t[l + "fc1.bias"][3] * 2;
                }
                else
                    foreach (var p in new[] { "q_proj", "k_proj", "v_proj" })
                    {
                        t[l + $"self_attn.{p}.weight"].narrow(0, 24, 8).copy_(t[l + $"self_attn.{p}.weight"].narrow(0, 8, 8));
                        t[l + $"self_attn.{p}.bias"].narrow(0, 24, 8).copy_(t[l + $"self_attn.{p}.bias"].narrow(0, 8, 8));
                    }
            },
        }.Write(tmp.Sub("m"));
        using var model = new OptModel(dir, CPU, ScalarType.Float64);
        var calib = RandomHidden(1);
        var fresh = RandomHidden(2);
        var pair = layer == 1 ? new long[] { 3, 7 } : new long[] { 1, 3 };
        foreach (var ordering in Snp)
        {
            using var block = model.LoadBlock(0);
            using var reference = block.Forward(fresh)!;
            var (_, gram) = Capture(block, layer, calib);
            var info = block.NodeLayers[layer];
            var order = Orderings.Order(ordering, Input(block, layer, gram));
            Assert.Contains(order[^1], pair);
            var kept = Units(order.Take(order.Length - 1), info.GroupSize);
            var pruned = Units(order.Skip(order.Length - 1), info.GroupSize);
            var (w, c) = block.Consumer(layer);
            var rec = Subspace.Reconstruct(gram, w, c, kept, pruned, ReconstructMode.Lstsq, 1e-10, "test");
            block.Prune(layer, kept, rec.Weight, rec.Bias);
            using var after = block.Forward(fresh)!;
            double rel = RelDiff(after, reference);
            Assert.True(rel < 1e-6, $"{ordering}: removing the redundant unit changed the block output by {rel:G3}");
        }
    }

    [Theory]
    [InlineData(ReconstructMode.Lstsq, 0.01)]
    [InlineData(ReconstructMode.Lstsq, 0.0)]
    [InlineData(ReconstructMode.Bias, 0.01)]
    [InlineData(ReconstructMode.None, 0.01)]
    public void Reported_error_equals_the_measured_consumer_output_error(ReconstructMode mode, double damp)
    {
        using var tmp = new TempDir();
        using var model = new OptModel(new TinyOpt().Write(tmp.Sub("m")), CPU, ScalarType.Float64);
        using var block = model.LoadBlock(1);
        foreach (int j in new[] { 0, 1 })
        {
            var (acts, gram) = Capture(block, j, RandomHidden(3));
            var info = block.NodeLayers[j];
            var order = Orderings.Order(Ordering.Zca, Input(block, j, gram, damp));
            int keep = info.Groups * 6 / 10;
            var kept = Units(order.Take(keep), info.GroupSize);
            var pruned = Units(order.Skip(keep), info.GroupSize);
            var (w, c) = block.Consumer(j);
            var rec = Subspace.Reconstruct(gram, w, c, kept, pruned, mode, damp, "test");
            var y = nn.functional.linear(acts, w, c);
            var yHat = nn.functional.linear(acts.index_select(1, torch.tensor(kept)), rec.Weight, rec.Bias);
            double measured = (y - yHat).square().sum(1).mean().item<double>();
            Assert.True(Math.Abs(measured - rec.Error) <= 1e-6 * measured, $"layer {j}: reported {rec.Error}, measured {measured}");
        }
    }

    [Fact]
    public void Least_squares_beats_bias_beats_none_and_matches_a_direct_solve()
    {
        using var tmp = new TempDir();
        using var model = new OptModel(new TinyOpt().Write(tmp.Sub("m")), CPU, ScalarType.Float64);
        using var block = model.LoadBlock(0);
        var (acts, gram) = Capture(block, 1, RandomHidden(4, batch: 8));
        var order = Orderings.Order(Ordering.Variance, Input(block, 1, gram));
        var kept = order.Take(40).OrderBy(x => x).ToArray();
        var pruned = order.Skip(40).OrderBy(x => x).ToArray();
        var (w, c) = block.Consumer(1);
        var e = new[] { ReconstructMode.Lstsq, ReconstructMode.Bias, ReconstructMode.None }
            .Select(m => Subspace.Reconstruct(gram, w, c, kept, pruned, m, 0.0, "test")).ToArray();
        Assert.True(e[0].Error < e[1].Error, $"lstsq {e[0].Error} ≥ bias {e[1].Error}");
        Assert.True(e[1].Error < e[2].Error, $"bias {e[1].Error} ≥ none {e[2].Error}");
        // Direct least squares on the raw activation matrix: x_P ≈ [1, x_K] β.
        var xk = torch.cat(new[] { torch.ones(acts.shape[0], 1, dtype: ScalarType.Float64), acts.index_select(1, torch.tensor(kept)) }, 1);
        var xp = acts.index_select(1, torch.tensor(pruned));
        var beta = torch.linalg.lstsq(xk, xp).Solution;   // [1+|K|, |P|]
        var wp = w.index_select(1, torch.tensor(pruned));
        var wDirect = w.index_select(1, torch.tensor(kept)) + wp.mm(beta.narrow(0, 1, kept.Length).t());
        var cDirect = c! + wp.mv(beta[0]);
        Assert.True(RelDiff(e[0].Weight, wDirect) < 1e-8);
        Assert.True(RelDiff(e[0].Bias!, cDirect) < 1e-8);
    }

    [Fact]
    public void Ldl_reproduces_the_permuted_gram_and_its_D_are_least_squares_residuals()
    {
        using var tmp = new TempDir();
        using var model = new OptModel(new TinyOpt().Write(tmp.Sub("m")), CPU, ScalarType.Float64);
        using var block = model.LoadBlock(0);
        var (acts, gram) = Capture(block, 0, RandomHidden(5, batch: 8));
        var order = Enumerable.Range(0, 32).Select(i => (long)i).ToArray();
        new Random(3).Shuffle(order);
        var (l, d, damping) = Subspace.Ldl(gram, order, 0.0, "test");
        Assert.Equal(0, damping.Escalations);
        var gp = Subspace.Permute(gram, order);
        Assert.True(RelDiff(l.mm(torch.diag(d)).mm(l.t()), gp) < 1e-9);
        Assert.True(d.min().item<double>() >= 0);
        Assert.Equal(1.0, l.diagonal().min().item<double>(), 12);
        var x = torch.cat(new[] { torch.ones(acts.shape[0], 1, dtype: ScalarType.Float64), acts.index_select(1, torch.tensor(order)) }, 1);
        foreach (int k in new[] { 1, 5, 17, 32 })
        {
            var prev = x.narrow(1, 0, k);
            var beta = torch.linalg.lstsq(prev, x.narrow(1, k, 1)).Solution;
            double resid = (x.narrow(1, k, 1) - prev.mm(beta)).square().mean().item<double>();
            Assert.True(Math.Abs(resid - d[k].item<double>()) <= 1e-8 * gram.diagonal().max().item<double>(), $"D_{k} = {d[k].item<double>()}, residual {resid}");
        }
    }

    [Fact]
    public void Error_is_non_increasing_in_the_number_of_kept_units()
    {
        using var tmp = new TempDir();
        using var model = new OptModel(new TinyOpt().Write(tmp.Sub("m")), CPU, ScalarType.Float64);
        using var block = model.LoadBlock(0);
        var (_, gram) = Capture(block, 1, RandomHidden(6, batch: 8));
        var order = Orderings.Order(Ordering.Zca, Input(block, 1, gram));
        var (w, c) = block.Consumer(1);
        double prev = double.PositiveInfinity;
        for (int k = 1; k <= order.Length; k += 3)
        {
            var rec = Subspace.Reconstruct(gram, w, c, order.Take(k).OrderBy(x => x).ToArray(), order.Skip(k).OrderBy(x => x).ToArray(), ReconstructMode.Lstsq, 1e-12, "test");
            Assert.True(rec.Error <= prev * (1 + 1e-9) + 1e-15, $"E({k}) = {rec.Error} > E(previous) = {prev}");
            prev = rec.Error;
        }
        Assert.Equal(0.0, Subspace.Reconstruct(gram, w, c, order.OrderBy(x => x).ToArray(), Array.Empty<long>(), ReconstructMode.Lstsq, 0, "t").Error);
    }

    [Fact]
    public void Every_ordering_returns_a_permutation_of_the_groups()
    {
        using var tmp = new TempDir();
        using var model = new OptModel(new TinyOpt().Write(tmp.Sub("m")), CPU, ScalarType.Float64);
        using var block = model.LoadBlock(0);
        foreach (int j in new[] { 0, 1 })
        {
            var (_, gram) = Capture(block, j, RandomHidden(7));
            foreach (var o in Enum.GetValues<Ordering>())
            {
                var order = Orderings.Order(o, Input(block, j, gram));
                Assert.Equal(Enumerable.Range(0, block.NodeLayers[j].Groups).Select(x => (long)x), order.OrderBy(x => x));
            }
        }
    }

    // ---- end to end: engine + written checkpoint ----

    static List<Tensor> CalibIds(int seed, int n = 6, int len = 24) =>
        Enumerable.Range(0, n).Select(i =>
        {
            var rng = new Random(seed + i);
            return torch.tensor(Enumerable.Range(0, len).Select(_ => (long)rng.Next(3, 96)).ToArray(), new long[] { 1, len });
        }).ToList();

    static readonly long[] ProbeIds = { 2, 17, 40, 8, 91, 33, 5, 60, 12, 77, 3, 48 };

    /// <summary>Prunes in memory (probe logits through the pruned blocks) and writes the checkpoint with the same options.</summary>
    static (Tensor InMemory, JsonObject Report) PruneBoth(string modelDir, string outDir, PruneOptions opt, bool padded = true)
    {
        var calib = CalibIds(11);
        Tensor probeLogits;
        using (var model = new OptModel(modelDir, CPU, ScalarType.Float64))
        {
            var probe = model.Embed(torch.tensor(ProbeIds, new long[] { 1, ProbeIds.Length }));
            new SnpEngine(model, opt).Run(calib, (block, _) => probe = block.Forward(probe)!);
            probeLogits = model.Head(probe);
        }
        using var m2 = new OptModel(modelDir, CPU, ScalarType.Float64);
        var report = PrunedCheckpoint.Write(new PrunedCheckpoint.Request
        {
            Model = m2, Options = opt, Calibration = calib, CalibrationInfo = new JsonObject(), OutDir = outDir,
            SourceDir = modelDir, ParamsBefore = m2.ParameterCount(), ExportPadded = padded,
        });
        return (probeLogits, report);
    }

    static Tensor Logits(string dir)
    {
        using var m = new OptModel(dir, CPU, ScalarType.Float64);
        return m.ForwardAllInMemory(torch.tensor(ProbeIds, new long[] { 1, ProbeIds.Length }));
    }

    /// <summary>
    /// The engine streams each sub-block once and reuses the head outputs of its statistics pass;
    /// this reference recomputes everything with whole-block forwards (capture, prune, forward again).
    /// Both must prune the same units and produce the same weights.
    /// </summary>
    [Theory]
    [MemberData(nameof(Shapes))]
    public void Engine_matches_a_naive_capture_and_reforward_reference(string name, TinyOpt shape)
    {
        using var tmp = new TempDir();
        string src = shape.Write(tmp.Sub("src"));
        var opt = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.4 };
        var calib = CalibIds(5);
        var engineWeights = new List<Dictionary<string, Tensor>>();
        using (var model = new OptModel(src, CPU, ScalarType.Float64))
            new SnpEngine(model, opt).Run(calib, (block, _) =>
                engineWeights.Add(block.Tensors(ScalarType.Float64).ToDictionary(t => t.Name, t => t.Tensor.clone())));

        using var reference = new OptModel(src, CPU, ScalarType.Float64);
        var hidden = calib.Select(reference.Embed).ToList();
        long tokens = hidden.Sum(h => h.shape[0] * h.shape[1]);
        for (int b = 0; b < reference.BlockCount; b++)
        {
            using var block = reference.LoadBlock(b);
            for (int j = 0; j < 2; j++)
            {
                var info = block.NodeLayers[j];
                using var acc = new GramAccumulator(info.Units, CPU);
                foreach (var h in hidden) block.Forward(h, j, a => acc.Add(a));
                using var gram = acc.Result("reference");
                var (w, c) = block.Consumer(j);
                var input = new OrderingInput(gram, w, c!, block.ProducerSquaredNorms(j), info.GroupSize, tokens, opt.Damp, 0, "reference");
                var order = Orderings.Order(Ordering.Zca, input);
                int keep = RatioPolicy.KeepForRatio(info.Groups, opt.Amount);
                var kept = Units(order.Take(keep), info.GroupSize);
                var pruned = Units(order.Skip(keep), info.GroupSize);
                var rec = Subspace.Reconstruct(gram, w, c, kept, pruned, ReconstructMode.Lstsq, opt.Damp, "reference");
                block.Prune(j, kept, rec.Weight, rec.Bias);
            }
            hidden = hidden.Select(h => block.Forward(h)!).ToList();
            foreach (var (tensorName, t) in block.Tensors(ScalarType.Float64))
            {
                var e = engineWeights[b][tensorName];
                Assert.Equal(t.shape, e.shape);
                Assert.True(RelDiff(e, t) < 1e-9, $"{name}: {tensorName} differs from the reference by {RelDiff(e, t):G3}");
            }
        }
    }

    [Theory]
    [InlineData(40, ScalarType.Float64)]
    [InlineData(1100, ScalarType.Float64)]   // wide: blocked lower triangle (512 + 512 + 76), mirrored
    [InlineData(1100, ScalarType.Float32)]
    public void Gram_accumulator_equals_the_augmented_second_moment(int units, ScalarType dtype)
    {
        var gen = new torch.Generator(5);
        // Uneven micro-batches, one longer than a chunk, non-zero means.
        var parts = new[] { 300, 9000, 17 }.Select(r => (torch.randn(new long[] { r, units }, ScalarType.Float64, generator: gen) + 0.5)).ToList();
        using var acc = new GramAccumulator(units, CPU);
        foreach (var p in parts) acc.Add(p.to(dtype));
        using var g = acc.Result("test");
        var all = torch.cat(parts.Select(p => p.to(dtype).to(ScalarType.Float64)).ToList(), 0);
        var aug = torch.cat(new[] { torch.ones(all.shape[0], 1, ScalarType.Float64), all }, 1);
        var expected = aug.t().mm(aug) / all.shape[0];
        double tol = dtype == ScalarType.Float64 ? 1e-12 : 1e-6;
        Assert.True(RelDiff(g, expected) < tol, $"relative difference {RelDiff(g, expected):G3}");
        Assert.Equal(0.0, (g - g.t()).abs().max().item<double>());
    }

    public static IEnumerable<object[]> Shapes => new[]
    {
        new object[] { "pre", new TinyOpt() },
        new object[] { "post", new TinyOpt { PreLayerNorm = false, ProjDim = 16, Tied = false, Prefix = "decoder." } },
    };

    [Theory]
    [MemberData(nameof(Shapes))]
    public void Written_checkpoint_and_padded_export_reproduce_the_in_memory_pruned_model(string name, TinyOpt shape)
    {
        using var tmp = new TempDir();
        string src = shape.Write(tmp.Sub("src"));
        foreach (var (opt, tag) in new[]
        {
            (new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.4, Ordering = Ordering.Obs }, "ratio"),
            (new PruneOptions { Policy = RatioPolicyKind.Variance, Amount = 0.9 }, "variance"),
            (new PruneOptions { Policy = RatioPolicyKind.Budget, Amount = 0.3, Ordering = Ordering.Id }, "budget"),
        })
        {
            string outDir = tmp.Sub($"out-{tag}");
            var (inMemory, report) = PruneBoth(src, outDir, opt);
            var reloaded = Logits(outDir);
            var padded = Logits(Path.Combine(outDir, "padded"));
            Assert.True(RelDiff(reloaded, inMemory) < 1e-6, $"{name}/{tag}: reloaded differs from in-memory by {RelDiff(reloaded, inMemory):G3}");
            Assert.True(RelDiff(padded, inMemory) < 1e-6, $"{name}/{tag}: padded export differs by {RelDiff(padded, inMemory):G3}");
            Assert.True(RelDiff(reloaded, Logits(src)) > 1e-6, $"{name}/{tag}: pruning changed nothing");
            // Parameter counts in the report are those of the written tensors.
            long written = CountParameters(outDir);
            Assert.Equal(written, (long)report["params_after"]!);
            using (var m = new OptModel(outDir)) Assert.Equal(written, m.ParameterCount());
            Assert.Equal((long)report["params_before"]! - (long)report["prunable_params_removed"]!, written);
            Assert.Equal(CountParameters(src), CountParameters(Path.Combine(outDir, "padded")));
            Assert.True(File.Exists(Path.Combine(outDir, PrunedCheckpoint.ReportFile)));
        }
    }

    static long CountParameters(string dir)
    {
        using var f = SafeTensorsFile.Open(Path.Combine(dir, "model.safetensors"));
        return f.Tensors.Values.Sum(e => e.NumElements);
    }

    [Theory]
    [InlineData(RatioPolicyKind.Ratio, 0.0)]
    [InlineData(RatioPolicyKind.Variance, 1.0)]
    public void Zero_pruning_leaves_logits_and_parameter_count_unchanged(RatioPolicyKind policy, double amount)
    {
        using var tmp = new TempDir();
        string src = new TinyOpt().Write(tmp.Sub("src"));
        var (inMemory, report) = PruneBoth(src, tmp.Sub("out"), new PruneOptions { Policy = policy, Amount = amount }, padded: false);
        var original = Logits(src);
        Assert.True(RelDiff(inMemory, original) < 1e-6);
        Assert.True(RelDiff(Logits(tmp.Sub("out")), original) < 1e-6);
        Assert.Equal(CountParameters(src), (long)report["params_after"]!);
    }

    [Theory]
    [InlineData(0.2, "mlp,heads")]
    [InlineData(0.35, "mlp")]
    [InlineData(0.5, "heads")]
    public void Budget_lands_within_one_unit_of_granularity(double budget, string targets)
    {
        using var tmp = new TempDir();
        string src = new TinyOpt { Layers = 3 }.Write(tmp.Sub("src"));
        var opt = new PruneOptions { Policy = RatioPolicyKind.Budget, Amount = budget, Targets = NodeKinds.ParseSet(targets, "targets") };
        var (_, report) = PruneBoth(src, tmp.Sub("out"), opt, padded: false);
        long prunable = (long)report["prunable_params"]!, removed = (long)report["prunable_params_removed"]!;
        long granularity = targets.Contains("heads") ? 4L * 8 * 32 + 3 * 8 : 2L * 32 + 1;
        Assert.True(Math.Abs(removed - budget * prunable) <= granularity,
            $"removed {removed} of {prunable}, requested {budget * prunable:F0} (granularity {granularity})");
        Assert.Equal(3 * (targets.Contains("heads") ? 1 : 0) + 3 * (targets.Contains("mlp") ? 1 : 0), report["layers"]!.AsArray().Count);
    }

    [Fact]
    public void Same_inputs_give_byte_identical_checkpoints()
    {
        using var tmp = new TempDir();
        string src = new TinyOpt().Write(tmp.Sub("src"));
        var opt = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.3, Ordering = Ordering.Random, Seed = 4 };
        var (_, r1) = PruneBoth(src, tmp.Sub("a"), opt, padded: false);
        var (_, r2) = PruneBoth(src, tmp.Sub("b"), opt, padded: false);
        Assert.Equal(File.ReadAllBytes(Path.Combine(tmp.Sub("a"), "model.safetensors")), File.ReadAllBytes(Path.Combine(tmp.Sub("b"), "model.safetensors")));
        r1.Remove("seconds"); r2.Remove("seconds");
        Assert.Equal(r1.ToJsonString(), r2.ToJsonString());
    }

    [Fact]
    public void Banded_finite_check_finds_a_bad_value_anywhere()
    {
        // 2100² F64 spans several bands of the check; the transposed view has non-contiguous rows.
        using var m = torch.randn(2100, 2100, ScalarType.Float64);
        Assert.True(Subspace.AllFinite(m));
        Assert.True(Subspace.AllFinite(m.t()));
        foreach (var (r, c, v) in new[] { (2099, 2099, double.NaN), (1500, 3, double.PositiveInfinity), (0, 0, double.NegativeInfinity) })
        {
            using var bad = m.clone();
            bad[r, c] = v;
            Assert.False(Subspace.AllFinite(bad), $"{v} at ({r}, {c})");
            Assert.False(Subspace.AllFinite(bad.t()), $"{v} at ({c}, {r}) of the transpose");
        }
        Assert.False(Subspace.AllFinite(torch.tensor(double.NaN)));
    }

    [Fact]
    public void Reconstruction_with_release_returns_the_grams_memory()
    {
        // 3000 units: a 69 MiB float64 Gram, above glibc's largest mmap threshold, so freeing it shows in RssAnon
        // (and fails to show if any view of it survived the release). The allocator is set up as the CLI sets
        // it: the factor's freed |K|² temporaries go back to the system rather than stay in glibc's heap.
        LlmSnp.Runtime.ConfigureHostMemory();
        const int n = 3000, tokens = 3200;
        var gen = new torch.Generator(7);
        var x = torch.cat(new[] { torch.ones(tokens, 1, dtype: ScalarType.Float64), torch.randn(new long[] { tokens, n }, ScalarType.Float64, generator: gen) }, 1);
        var gram = x.t().mm(x);
        gram.div_(tokens);
        x.Dispose();
        var w = torch.randn(new long[] { 4, n }, ScalarType.Float64, generator: gen);
        var c = torch.randn(new long[] { 4 }, ScalarType.Float64, generator: gen);
        var kept = Enumerable.Range(0, 2700).Select(i => (long)i).ToArray();
        var pruned = Enumerable.Range(2700, n - 2700).Select(i => (long)i).ToArray();
        // A first run on a copy: BLAS/LAPACK buffers and threads that persist after first use are not the Gram.
        Subspace.Reconstruct(gram.clone(), w, c, kept, pruned, ReconstructMode.Lstsq, 1e-6, "warm-up", releaseGram: true);
        LlmSnp.Runtime.TrimHostHeap();
        long before = LlmSnp.Benchmarks.MemoryMonitor.Sample();
        var rec = Subspace.Reconstruct(gram, w, c, kept, pruned, ReconstructMode.Lstsq, 1e-6, "test", releaseGram: true);
        LlmSnp.Runtime.TrimHostHeap();
        long after = LlmSnp.Benchmarks.MemoryMonitor.Sample();
        Assert.True(after < before - (48L << 20), $"RssAnon {before >> 20} MiB → {after >> 20} MiB: the Gram's 69 MiB were not returned");
        Assert.True(gram.IsInvalid, "the Gram's handle was released");
        Assert.True(rec.Error >= 0 && rec.RelativeError is > 0 and < 1, $"relative error {rec.RelativeError}");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Damping_escalates_on_a_singular_gram_and_factors_the_damped_matrix(bool overwrite)
    {
        // Unit 5 duplicates unit 2: the undamped Gram is singular, so λ = 0 must be raised.
        var gen = new torch.Generator(11);
        var x = torch.randn(new long[] { 200, 6 }, ScalarType.Float64, generator: gen);
        x.narrow(1, 5, 1).copy_(x.narrow(1, 2, 1));
        var aug = torch.cat(new[] { torch.ones(200, 1, dtype: ScalarType.Float64), x }, 1);
        var g = aug.t().mm(aug).div_(200);
        var original = g.clone();
        var (l, damping) = Subspace.DampedCholesky(g, 0.0, "test", overwrite);
        Assert.True(damping.Escalations > 0 && damping.Lambda > 0, $"{damping}");
        var mask = torch.ones(7, ScalarType.Float64);
        mask[0] = 0.0;
        var expected = original + torch.diag(mask * damping.Lambda);   // the constant (index 0) is never damped
        Assert.True(l.mm(l.t()).allclose(expected, rtol: 0, atol: 1e-12), "L Lᵀ is the damped Gram");
        Assert.True(overwrite ? g.allclose(expected, rtol: 0, atol: 1e-15) : g.allclose(original, 0, 0),
            overwrite ? "overwrite leaves the damped Gram in place" : "the input is untouched");
    }
}
