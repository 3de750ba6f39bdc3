using System.Text.Json.Nodes;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// Pruning mixtures: expert removal (the three criteria and the fold against closed forms computed here with the
/// independent <see cref="MoeReference"/>), SNP inside experts (each expert's reconstruction error against the
/// routing-weighted least squares of its routed tokens), experts with few tokens, and pruned checkpoints reloaded
/// with the right config and computing what the reference computes from the written weights.
/// </summary>
public class ExpertPruningTests
{
    static string Fixture(string name) => MixtureTests.Fixture(name);

    /// <summary>Seeded calibration ids: <paramref name="batches"/> micro-batches of 2 sequences of <paramref name="len"/> tokens.</summary>
    static List<Tensor> Calibration(int batches, int len, int seed = 7)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, batches).Select(_ => torch.tensor(Enumerable.Range(0, 2 * len).Select(_ => (long)rng.Next(3, 512)).ToArray(), new long[] { 2, len })).ToList();
    }

    static JsonObject Prune(string fixture, string outDir, PruneOptions options, List<Tensor> calib) => PruneDir(Fixture(fixture), outDir, options, calib);

    static JsonObject PruneDir(string dir, string outDir, PruneOptions options, List<Tensor> calib)
    {
        using var model = ModelFamilies.Open(dir, CPU, ScalarType.Float64);
        return PrunedCheckpoint.Write(new PrunedCheckpoint.Request
        {
            Model = model, Options = options, Calibration = calib, CalibrationInfo = new JsonObject { ["source"] = "random ids" },
            OutDir = outDir, SourceDir = dir, ParamsBefore = model.ParameterCount(),
        });
    }

    static JsonObject Layer(JsonObject report, int i) => report["experts"]!.AsArray().Select(x => x!.AsObject()).Single(x => ((string)x["name"]!).StartsWith($"layers.{i}."));

    static long[] Kept(JsonObject layer) => layer["kept"]!.AsArray().Select(x => (long)x!).ToArray();

    /// <summary>The calibration rows entering layer 0's mixture, through the reference (layer 0's attention is unpruned in these tests).</summary>
    static Tensor MixtureInput(MoeReference r, List<Tensor> calib) =>
        torch.cat(calib.SelectMany(b => Enumerable.Range(0, (int)b.shape[0]).Select(s => r.MlpInput(0, r.AfterAttention(0, r.Embed(b[s].data<long>().ToArray()))))).ToArray(), 0);

    /// <summary>Per expert, its contribution w·f(x) for every row (zero where the router did not choose it) [rows, hidden].</summary>
    static Tensor[] Contributions(MoeReference r, Tensor x)
    {
        int experts = r.Experts(0);
        var (chosen, weights) = r.Route(0, x);
        var c = Enumerable.Range(0, experts).Select(_ => torch.zeros(x.shape[0], x.shape[1], ScalarType.Float64)).ToArray();
        for (int t = 0; t < x.shape[0]; t++)
            for (int k = 0; k < chosen[t].Length; k++)
            {
                int e = chosen[t][k];
                var xt = x.narrow(0, t, 1);
                c[e][t] = (weights[t][k] * r.ExpertActivations(0, e, xt).matmul(r.ExpertDown(0, e).t()))[0];
            }
        return c;
    }

    static double Rss(Tensor y, Tensor[] features)
    {
        if (features.Length == 0) return y.square().sum().item<double>();
        var a = torch.stack(features.Select(f => f.reshape(-1)).ToArray(), 1);
        var s = torch.linalg.lstsq(a, y.reshape(-1, 1)).Solution;
        return (y.reshape(-1, 1) - a.mm(s)).square().sum().item<double>();
    }

    [Theory]
    [InlineData("mixtral")]
    [InlineData("qwen3_moe")]
    public void The_test_reference_reproduces_the_goldens(string fixture)
    {
        var (ids, logits, _) = GoldenFile.Read(Fixture(fixture));
        using var r = new MoeReference(Fixture(fixture));
        for (int s = 0; s < ids.Length; s++)
        {
            using var want = torch.tensor(logits[s].SelectMany(x => x).ToArray(), new long[] { logits[s].Length, logits[s][0].Length }, ScalarType.Float64);
            using var got = r.Logits(ids[s]);
            Assert.True((got - want).abs().max().item<double>() < 1e-9);
        }
    }

    /// <summary>
    /// Removing experts keeps the first K of an elimination order: each step drops the expert whose removal raises the
    /// residual of y = Σ_e c_e regressed on the remaining contributions least — checked by refitting every candidate set here.
    /// </summary>
    [Fact]
    public void Snp_criterion_is_backward_elimination_on_the_experts_contributions()
    {
        using var tmp = new TempDir();
        var calib = Calibration(4, 32);
        var report = Prune("mixtral", tmp.Sub("out"), new PruneOptions
        {
            Policy = RatioPolicyKind.Ratio, Amount = 0, Damp = 0, Targets = new HashSet<NodeKind> { NodeKind.Heads },
            Experts = new ExpertOptions { Keep = 2, Criterion = ExpertCriterion.Snp, Fold = ExpertFold.None },
        }, calib);
        using var r = new MoeReference(Fixture("mixtral"));
        var x = MixtureInput(r, calib);
        var c = Contributions(r, x);
        var y = c.Aggregate((a, b) => a + b);
        double energy = y.square().sum().item<double>();
        var active = Enumerable.Range(0, 4).ToList();
        var removed = new List<(int Expert, double Rise)>();
        while (active.Count > 2)
        {
            double full = Rss(y, active.Select(e => c[e]).ToArray());
            var rises = active.Select(e => (e, Rss(y, active.Where(o => o != e).Select(o => c[o]).ToArray()) - full)).ToList();
            var best = rises.OrderBy(p => p.Item2).First();
            removed.Add((best.e, best.Item2 / energy));
            active.Remove(best.e);
        }
        var layer = Layer(report, 0);
        Assert.Equal(active.Select(e => (long)e), Kept(layer));
        var per = layer["per_expert"]!.AsArray();
        foreach (var (e, rise) in removed)
        {
            var rec = per[e]!.AsObject();
            Assert.False((bool)rec["kept"]!);
            Assert.True(Math.Abs((double)rec["score"]! - rise) < 1e-9 + 1e-7 * rise, $"expert {e}: score {(double)rec["score"]!:R}, refit {rise:R}");
            Assert.Contains("unexplained", (string)rec["removed_because"]!);
        }
        // Without the fold, the removal error is the mixture output's change under rerouting (no refit), reported relative to ‖y‖².
        Assert.True((double)layer["relative_error_removed"]! == (double)layer["relative_error_folded"]!);
    }

    /// <summary>REAP's saliency and the frequency criterion: per expert, the mean of w·‖f(x)‖ and the count over its routed tokens.</summary>
    [Theory]
    [InlineData(ExpertCriterion.Reap)]
    [InlineData(ExpertCriterion.Frequency)]
    public void Reap_and_frequency_scores_are_the_routed_tokens_means_and_counts(ExpertCriterion criterion)
    {
        using var tmp = new TempDir();
        var calib = Calibration(4, 32);
        var report = Prune("qwen3_moe", tmp.Sub("out"), new PruneOptions
        {
            Policy = RatioPolicyKind.Ratio, Amount = 0, Targets = new HashSet<NodeKind> { NodeKind.Heads },
            Experts = new ExpertOptions { KeepFraction = 0.5, Criterion = criterion, Fold = ExpertFold.None },
        }, calib);
        using var r = new MoeReference(Fixture("qwen3_moe"));
        var x = MixtureInput(r, calib);
        var (chosen, weights) = r.Route(0, x);
        var count = new double[8];
        var sum = new double[8];
        for (int t = 0; t < chosen.Length; t++)
            for (int k = 0; k < chosen[t].Length; k++)
            {
                int e = chosen[t][k];
                var f = r.ExpertActivations(0, e, x.narrow(0, t, 1)).matmul(r.ExpertDown(0, e).t());
                count[e]++;
                sum[e] += weights[t][k] * f.norm().item<double>();
            }
        var score = Enumerable.Range(0, 8).Select(e => criterion == ExpertCriterion.Frequency ? count[e] : count[e] > 0 ? sum[e] / count[e] : 0).ToArray();
        var layer = Layer(report, 0);
        var per = layer["per_expert"]!.AsArray();
        for (int e = 0; e < 8; e++)
        {
            Assert.Equal((long)count[e], (long)per[e]!["tokens"]!);
            Assert.True(Math.Abs((double)per[e]!["score"]! - score[e]) < 1e-9 * Math.Max(1, score[e]), $"expert {e}: {(double)per[e]!["score"]!:R} vs {score[e]:R}");
        }
        Assert.Equal(Enumerable.Range(0, 8).OrderByDescending(e => score[e]).ThenBy(e => e).Take(4).Order().Select(e => (long)e), Kept(layer));
        Assert.Equal(chosen.Length * 2L, layer["tokens_per_expert"]!.AsArray().Sum(t => (long)t!));
        Assert.DoesNotContain(report["experts"]!.AsArray(), l => ((string)l!["name"]!).StartsWith("layers.1."));   // dense
    }

    /// <summary>
    /// The fold: with the removed experts' tokens rerouted among the kept ones (softmax over the kept router rows, top-k,
    /// renormalised), the scales s minimise Σ_t ‖y_t − Σ_k s_k u_tk‖² — the direct least squares here — and the written
    /// down_proj of each kept expert is s_k times its original.
    /// </summary>
    [Fact]
    public void Fold_scales_are_the_least_squares_of_the_layer_output_under_the_new_routing()
    {
        using var tmp = new TempDir();
        var calib = Calibration(4, 32);
        var report = Prune("mixtral", tmp.Sub("out"), new PruneOptions
        {
            Policy = RatioPolicyKind.Ratio, Amount = 0, Damp = 0, Targets = new HashSet<NodeKind> { NodeKind.Heads },
            Experts = new ExpertOptions { Keep = 3, Criterion = ExpertCriterion.Reap, Fold = ExpertFold.Scale },
        }, calib);
        var layer = Layer(report, 0);
        var kept = Kept(layer);
        using var r = new MoeReference(Fixture("mixtral"));
        using var written = new MoeReference(tmp.Sub("out"));
        Assert.Equal(3, written.Experts(0));
        var x = MixtureInput(r, calib);
        var y = r.Mixture(0, x);
        // New routing: the written router has the kept rows, so its routing is the rerouted one; u_k with the original down_proj.
        var (chosen, weights) = written.Route(0, x);
        var u = kept.Select(_ => torch.zeros_like(y)).ToArray();
        for (int t = 0; t < chosen.Length; t++)
            for (int k = 0; k < chosen[t].Length; k++)
            {
                int pos = chosen[t][k];
                u[pos][t] = (weights[t][k] * r.ExpertActivations(0, (int)kept[pos], x.narrow(0, t, 1)).matmul(r.ExpertDown(0, (int)kept[pos]).t()))[0];
            }
        var a = torch.stack(u.Select(v => v.reshape(-1)).ToArray(), 1);
        var s = torch.linalg.lstsq(a, y.reshape(-1, 1)).Solution.reshape(-1).data<double>().ToArray();
        var per = layer["per_expert"]!.AsArray();
        double energy = y.square().sum().item<double>();
        for (int pos = 0; pos < kept.Length; pos++)
        {
            double reported = (double)per[(int)kept[pos]]!["scale"]!;
            Assert.True(Math.Abs(reported - s[pos]) < 1e-8, $"expert {kept[pos]}: scale {reported:R}, least squares {s[pos]:R}");
            // Written in the stored float32: s · W rounded once.
            var ratio = written.ExpertDown(0, pos) / r.ExpertDown(0, (int)kept[pos]);
            Assert.True((ratio - s[pos]).abs().max().item<double>() < 1e-6);
        }
        double before = (y - u.Aggregate((p, q) => p + q)).square().sum().item<double>() / energy;
        double after = Rss(y, u) / energy;
        Assert.True(Math.Abs((double)layer["relative_error_removed"]! - before) < 1e-9, $"removed: {(double)layer["relative_error_removed"]!:R} vs {before:R}");
        Assert.True(Math.Abs((double)layer["relative_error_folded"]! - after) < 1e-9, $"folded: {(double)layer["relative_error_folded"]!:R} vs {after:R}");
        Assert.True(after < before);
    }

    /// <summary>
    /// SNP inside each expert: the reported error is Σ_t w_t² ‖W a_t − W' a_t,K‖² / Σ_t w_t² over the tokens routed to
    /// the expert (w its routing weight), computed here from the original and written weights; and W' is that weighted
    /// least squares' minimiser (the bias-free fit: the stock expert has no down_proj bias).
    /// </summary>
    [Theory]
    [InlineData("mixtral")]
    [InlineData("qwen3_moe")]
    public void Each_experts_reconstruction_error_is_its_routing_weighted_least_squares(string fixture)
    {
        using var tmp = new TempDir();
        var calib = Calibration(8, 64);
        // A float32 copy (qwen3_moe is stored in BF16): the written W' is then the solve's to float32 rounding.
        string src = MixtureTests.Edited(tmp, fixture, tensors: w => { foreach (var k in w.Keys.ToList()) w[k] = w[k].to(ScalarType.Float32); });
        var report = PruneDir(src, tmp.Sub("out"), new PruneOptions
        {
            Policy = RatioPolicyKind.Ratio, Amount = 0.3, Damp = 0, Targets = new HashSet<NodeKind> { NodeKind.Expert },
        }, calib);
        using var r = new MoeReference(src);
        using var written = new MoeReference(tmp.Sub("out"));
        var x = MixtureInput(r, calib);
        var (chosen, weights) = r.Route(0, x);
        int experts = r.Experts(0);
        var layers = report["layers"]!.AsArray().Select(l => l!.AsObject()).ToDictionary(l => (string)l["name"]!);
        string names = fixture == "mixtral" ? "block_sparse_moe.experts" : "mlp.experts";
        for (int e = 0; e < experts; e++)
        {
            var rows = Enumerable.Range(0, chosen.Length).SelectMany(t => Enumerable.Range(0, chosen[t].Length).Where(k => chosen[t][k] == e).Select(k => (t, w: weights[t][k]))).ToArray();
            var xe = x.index_select(0, torch.tensor(rows.Select(q => (long)q.t).ToArray()));
            var w = torch.tensor(rows.Select(q => q.w).ToArray()).unsqueeze(1);
            var act = r.ExpertActivations(0, e, xe);
            var l = layers[$"layers.0.{names}.{e}"];
            var keptUnits = torch.tensor(l["kept_neurons"]!.AsArray().Select(u => (long)u!).ToArray());
            var target = act.matmul(r.ExpertDown(0, e).t());
            var ak = act.index_select(1, keptUnits);
            var err = ((target - ak.matmul(written.ExpertDown(0, e).t())) * w).square().sum().item<double>() / w.square().sum().item<double>();
            double reported = (double)l["error"]!;
            Assert.True(Math.Abs(reported - err) < 1e-6 * Math.Max(1e-3, err), $"expert {e}: reported {reported:R}, closed form {err:R}");
            Assert.Equal("lstsq-nobias", (string)l["reconstruct_used"]!);
            var best = torch.linalg.lstsq(ak * w, target * w).Solution.t();
            Assert.True((best - written.ExpertDown(0, e)).abs().max().item<double>() < 1e-6 * best.abs().max().item<double>());
        }
    }

    /// <summary>Every sparse layer keeps K experts; the checkpoint reloads with K in the stock field and computes what the reference computes from it.</summary>
    [Theory]
    [InlineData("mixtral", ExpertCriterion.Snp, "num_local_experts", 3)]
    [InlineData("mixtral", ExpertCriterion.Frequency, "num_local_experts", 2)]
    [InlineData("qwen3_moe", ExpertCriterion.Reap, "num_experts", 4)]
    [InlineData("qwen3_moe", ExpertCriterion.Snp, "num_experts", 5)]
    public void Pruned_mixtures_reload_with_the_kept_experts_and_compute_what_the_reference_does(string fixture, ExpertCriterion criterion, string field, int keep)
    {
        using var tmp = new TempDir();
        var report = Prune(fixture, tmp.Sub("out"), new PruneOptions
        {
            Policy = RatioPolicyKind.Ratio, Amount = 0.25, UniformWidths = true,
            Experts = new ExpertOptions { Keep = keep, Criterion = criterion },
        }, Calibration(4, 32));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Sub("out"), "config.json")))!.AsObject();
        Assert.Equal(keep, (int)cfg[field]!);
        Assert.True((bool)report["stock_loadable"]!, (string?)report["stock_loadable_why_not"]);
        Assert.True((long)report["active_params_after"]! < (long)report["active_params_before"]!);
        Assert.True((long)report["params_after"]! < (long)report["params_before"]!);
        using var model = ModelFamilies.OpenLanguageModel(tmp.Sub("out"), CPU, ScalarType.Float64);
        Assert.Equal(keep, ((IMixtureModel)model).Experts);
        Assert.Equal((long)report["params_after"]!, model.ParameterCount());
        Assert.Equal((long)report["active_params_after"]!, ((IMixtureModel)model).ActiveParameterCount());
        using var r = new MoeReference(tmp.Sub("out"));
        var ids = Enumerable.Range(0, 24).Select(i => (long)(1 + (i * 37) % 500)).ToArray();
        using var got = LlamaTests.Forward(model, torch.tensor(ids, new long[] { 1, ids.Length })).squeeze(0);
        using var want = r.Logits(ids);
        Assert.True((got - want).abs().max().item<double>() < 1e-9);
        foreach (var l in report["experts"]!.AsArray())
        {
            Assert.Equal(keep, Kept(l!.AsObject()).Length);
            Assert.All(l["per_expert"]!.AsArray().Where(p => !(bool)p!["kept"]!), p => Assert.False(string.IsNullOrEmpty((string?)p!["removed_because"])));
        }
    }

    /// <summary>
    /// Experts with fewer routed tokens than neurons (a singular Gram) are reported; `keep` leaves them whole, `damp`
    /// prunes them on the damped Gram, and equal widths (--uniform) always prune them alike.
    /// </summary>
    [Theory]
    [InlineData(FewTokenPolicy.KeepWhole, false, "kept whole")]
    [InlineData(FewTokenPolicy.Damp, false, "pruned on the damped Gram")]
    [InlineData(FewTokenPolicy.KeepWhole, true, "pruned on the damped Gram")]
    public void Experts_with_few_calibration_tokens_are_reported_and_handled(FewTokenPolicy policy, bool uniform, string handled)
    {
        using var tmp = new TempDir();
        // 2 × 16 tokens, each to 2 of 4 experts: at most 32 tokens for 96 neurons.
        var report = Prune("mixtral", tmp.Sub("out"), new PruneOptions
        {
            Policy = RatioPolicyKind.Ratio, Amount = 0.25, FewTokenExperts = policy, UniformWidths = uniform,
            Targets = new HashSet<NodeKind> { NodeKind.Expert },
        }, Calibration(1, 16));
        foreach (var l in report["experts"]!.AsArray())
        {
            var few = l!["few_tokens"]!.AsArray();
            Assert.Equal(4, few.Count);
            Assert.All(few.Where(f => (long)f!["tokens"]! > 0), f => Assert.Equal(handled, (string)f!["handled"]!));
        }
        int widthKept = policy == FewTokenPolicy.KeepWhole && !uniform ? 96 : 72;
        Assert.All(report["layers"]!.AsArray().Where(l => (string)l!["kind"]! == "experts"), l => Assert.Equal(widthKept, (int)l!["units_kept"]!));
        if (widthKept == 96) Assert.All(report["layers"]!.AsArray().Where(l => (string)l!["kind"]! == "experts"), l => Assert.Contains("kept whole", (string)l!["kept_whole_because"]!));
    }

    /// <summary>
    /// The budget policy plans on the experts the plan pass keeps, and the pruning pass keeps the same ones (else a planned
    /// width would land on another expert): the removal is close to the budget and the checkpoint computes what the
    /// reference computes from it.
    /// </summary>
    [Fact]
    public void Budget_with_expert_removal_prunes_the_planned_experts_to_the_budget()
    {
        using var tmp = new TempDir();
        var report = Prune("qwen3_moe", tmp.Sub("out"), new PruneOptions
        {
            Policy = RatioPolicyKind.Budget, Amount = 0.3, Experts = new ExpertOptions { Keep = 5 },
        }, Calibration(4, 32));
        Assert.InRange((double)report["prunable_fraction_removed"]!, 0.27, 0.33);
        Assert.All(report["experts"]!.AsArray(), l => Assert.Equal(5, Kept(l!.AsObject()).Length));
        using var model = ModelFamilies.OpenLanguageModel(tmp.Sub("out"), CPU, ScalarType.Float64);
        using var r = new MoeReference(tmp.Sub("out"));
        var ids = Enumerable.Range(0, 20).Select(i => (long)(3 + (i * 53) % 500)).ToArray();
        using var got = LlamaTests.Forward(model, torch.tensor(ids, new long[] { 1, ids.Length })).squeeze(0);
        using var want = r.Logits(ids);
        Assert.True((got - want).abs().max().item<double>() < 1e-9);
    }

    /// <summary>Expert options the model cannot honour: one line, exit 1, nothing written (no output, no staging directory).</summary>
    [Fact]
    public void Bad_expert_options_are_one_line_and_write_nothing()
    {
        using var tmp = new TempDir();
        string mixtral = tmp.Sub("mixtral");
        Directory.CreateDirectory(mixtral);
        foreach (var f in Directory.GetFiles(Fixture("mixtral"))) File.Copy(f, Path.Combine(mixtral, Path.GetFileName(f)));
        File.Copy(Path.Combine(Repo.Root, "models", "stories260k", "tokenizer.model"), Path.Combine(mixtral, "tokenizer.model"));
        string badRouter = MixtureTests.Edited(tmp, "mixtral", c => c["num_local_experts"] = 3);
        string stories = Path.Combine(Repo.Root, "models", "stories260k");
        var cases = new (string Model, string[] Args, string[] Mentions)[]
        {
            (mixtral, ["--experts-keep", "0"], ["--experts-keep 0", "at least one expert"]),
            (mixtral, ["--experts-keep", "5"], ["--experts-keep 5", "4 experts", "num_local_experts"]),
            (mixtral, ["--experts-keep", "1"], ["--experts-keep 1", "below the 2", "num_experts_per_tok"]),
            (mixtral, ["--experts-keep", "0.2"], ["--experts-keep 0.2", "keeps 1 experts", "num_experts_per_tok"]),
            (mixtral, ["--experts-keep", "2.5"], ["--experts-keep", "'2.5'"]),
            (mixtral, ["--experts-criterion", "reap"], ["--experts-criterion needs --experts-keep"]),
            (mixtral, ["--experts-keep", "2", "--experts-criterion", "best"], ["--experts-criterion", "'best'"]),
            (mixtral, ["--experts-keep", "2", "--export-padded"], ["--export-padded", "removed expert"]),
            (stories, ["--experts-keep", "2"], ["--experts-keep 2", "dense llama model"]),
            (badRouter, ["--experts-keep", "2"], ["block_sparse_moe.gate.weight", "[4, 64]", "[3, 64]"]),
        };
        foreach (var (model, args, mentions) in cases)
        {
            string outDir = tmp.Sub("out");
            var r = CliHarness.Run(new[] { "prune", "--model", model, "--out", outDir, "--calib", "tinystories", "--calib-samples", "2", "--calib-seqlen", "32", "--ratio", "0.2" }.Concat(args).ToArray());
            CliHarness.FailsStrict(r, onlyLine: true, completeLine: true, mentions);
            Assert.False(Directory.Exists(outDir), r.ToString());
            Assert.Empty(Directory.GetFileSystemEntries(tmp.Path, ".out*"));
        }
    }
}
