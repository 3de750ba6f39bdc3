using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Evaluation;
using LlmSnp.Generation;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// The mixture families (Mixtral, Qwen3-MoE): logits and each token's chosen experts and weights against the float64
/// references in tests/fixtures/golden-families, the cached forward against the full one, and bad configs and
/// checkpoints refused in one line.
/// </summary>
public class MixtureTests
{
    internal static string Fixture(string name) => Repo.Fixture(Path.Combine("golden-families", name));

    /// <summary>The first sequence's routing per layer: [tokens][k] expert ids and weights (null for a dense layer).</summary>
    static (int[][]?[] Experts, double[][]?[] Weights) GoldenRouting(string dir)
    {
        var g = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "golden.json")))!;
        int[][]? E(JsonNode? n) => n is JsonArray a ? a.Select(t => t!.AsArray().Select(x => (int)x!).ToArray()).ToArray() : null;
        double[][]? Wt(JsonNode? n) => n is JsonArray a ? a.Select(t => t!.AsArray().Select(x => (double)x!).ToArray()).ToArray() : null;
        return (g["router_topk"]!.AsArray().Select(E).ToArray(), g["router_weights"]!.AsArray().Select(Wt).ToArray());
    }

    /// <summary>Streams one sequence; per sparse layer, the experts and weights the router chose, by token and rank.</summary>
    internal static (long[,]?[] Experts, double[,]?[] Weights, Tensor Logits) ForwardWithRouting(ILanguageModel m, long[] ids)
    {
        using var scope = NewDisposeScope();
        var h = m.Embed(torch.tensor(ids, new long[] { 1, ids.Length }));
        var experts = new long[m.BlockCount][,];
        var weights = new double[m.BlockCount][,];
        for (int i = 0; i < m.BlockCount; i++)
        {
            using var b = (IMixtureBlock)m.LoadBlock(i);
            if (b.ExpertSubBlock is int s)
            {
                var afterAttention = b.Advance(0, h);
                int k = b.TopK;
                var e = new long[ids.Length, k];
                var w = new double[ids.Length, k];
                var kept = b.KeptExperts;
                b.Route(afterAttention, r =>
                {
                    var slots = r.Slots.data<long>().ToArray();
                    var ws = r.Weights.to(ScalarType.Float64).data<double>().ToArray();
                    for (int x = 0; x < slots.Length; x++)
                    {
                        e[slots[x] / k, slots[x] % k] = kept[r.Expert];
                        w[slots[x] / k, slots[x] % k] = ws[x];
                    }
                });
                experts[i] = e;
                weights[i] = w;
                h = b.Advance(s, afterAttention);
            }
            else h = b.Forward(h)!;
        }
        return (experts, weights, m.Head(h).squeeze(0).to(ScalarType.Float64).MoveToOuterDisposeScope());
    }

    /// <summary>
    /// F64 within 1e-9 and F32 within 1e-4 of the reference logits; the routing identical (the fixtures' smallest gap
    /// between the 2nd and 3rd router probability, 0.0021, is far above float32 rounding) with weights within 1e-12 / 1e-6.
    /// </summary>
    [Theory]
    [InlineData("mixtral", ScalarType.Float64, 1e-9, 1e-12)]
    [InlineData("mixtral", ScalarType.Float32, 1e-4, 1e-6)]
    [InlineData("qwen3_moe", ScalarType.Float64, 1e-9, 1e-12)]
    [InlineData("qwen3_moe", ScalarType.Float32, 1e-4, 1e-6)]
    public void Forward_and_routing_match_the_float64_reference(string fixture, ScalarType dtype, double tol, double weightTol)
    {
        string dir = Fixture(fixture);
        var (ids, logits, nll) = GoldenFile.Read(dir);
        var (wantExperts, wantWeights) = GoldenRouting(dir);
        using var model = ModelFamilies.OpenLanguageModel(dir, CPU, dtype);
        Assert.Equal(fixture, model.Family);
        Assert.Empty(model.UnusedTensors);
        for (int s = 0; s < ids.Length; s++)
        {
            var (experts, weights, got) = ForwardWithRouting(model, ids[s]);
            using (got)
            using (var want = torch.tensor(logits[s].SelectMany(x => x).ToArray(), new long[] { logits[s].Length, logits[s][0].Length }, ScalarType.Float64))
            {
                double maxAbs = (got - want).abs().max().item<double>();
                Assert.True(maxAbs < tol, $"{fixture} {dtype} seq {s}: max |Δlogit| = {maxAbs:G3} ≥ {tol}");
            }
            var ppl = Perplexity.Evaluate(model, ids[s].Select(x => (int)x).ToArray(), ids[s].Length, null, "golden");
            Assert.InRange(ppl.FirstWindowNll, nll[s] - 1e-4, nll[s] + 1e-4);
            if (s != 0) continue;   // the references record the first sequence's routing
            for (int layer = 0; layer < model.BlockCount; layer++)
            {
                Assert.Equal(wantExperts[layer] is null, experts[layer] is null);
                if (wantExperts[layer] is not { } we) continue;
                for (int t = 0; t < we.Length; t++)
                    for (int r = 0; r < we[t].Length; r++)
                    {
                        Assert.True(we[t][r] == experts[layer]![t, r], $"{fixture} layer {layer} token {t} rank {r}: expert {experts[layer]![t, r]}, reference {we[t][r]}");
                        Assert.True(Math.Abs(wantWeights[layer]![t][r] - weights[layer]![t, r]) < weightTol,
                            $"{fixture} layer {layer} token {t} rank {r}: weight {weights[layer]![t, r]:R}, reference {wantWeights[layer]![t][r]:R}");
                    }
            }
        }
    }

    /// <summary>The cached forward (prefill, single tokens, a chunk past 0) computes what the full forward does.</summary>
    [Theory]
    [InlineData("mixtral")]
    [InlineData("qwen3_moe")]
    public void Cached_generation_equals_the_full_forward(string fixture)
    {
        using var model = ModelFamilies.OpenLanguageModel(Fixture(fixture), CPU, ScalarType.Float64);
        var (ids, _, _) = GoldenFile.Read(Fixture(fixture));
        using var input = torch.tensor(ids[1], new long[] { 1, ids[1].Length });
        using var full = LlamaTests.Forward(model, input);
        using var decoder = new CachedDecoder(model, ids[1].Length);
        var outs = new List<Tensor>();
        int at = 0;
        foreach (int len in new[] { 5, 1, 1, 3, 6 })
        {
            outs.Add(decoder.Forward(input.narrow(1, at, len), allLogits: true));
            at += len;
        }
        using var cached = torch.cat(outs, 1);
        double d = (full - cached).abs().max().item<double>();
        Assert.True(d < 1e-10, $"{fixture}: cached vs full max |Δ| = {d:G3}");
    }

    /// <summary>A copy of a fixture with its config (and optionally its tensors) edited.</summary>
    internal static string Edited(TempDir tmp, string fixture, Action<JsonObject>? config = null, Action<Dictionary<string, Tensor>>? tensors = null)
    {
        string dir = tmp.Sub(fixture + "-" + Guid.NewGuid().ToString("N")[..6]);
        Directory.CreateDirectory(dir);
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixture(fixture), "config.json")))!.AsObject();
        config?.Invoke(cfg);
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        if (tensors is null) File.Copy(Path.Combine(Fixture(fixture), "model.safetensors"), Path.Combine(dir, "model.safetensors"));
        else
        {
            using var r = new CheckpointReader(Fixture(fixture));
            var w = r.Names.ToDictionary(n => n, n => r.Read(n, SafeTensorsDType(r, n), CPU));
            tensors(w);
            SafeTensorsWriter.WriteAll(dir, w.Select(kv => (kv.Key, kv.Value)));
        }
        return dir;
    }

    static ScalarType SafeTensorsDType(CheckpointReader r, string name) => SafeDTypes.ToTorch(r.Entry(name).DType);

    static void AssertRefused(string dir, params string[] mustContain)
    {
        var e = Assert.Throws<LlmSnpException>(() => { using var m = ModelFamilies.Open(dir); });
        Assert.DoesNotContain('\n', e.Message);
        foreach (var s in mustContain) Assert.Contains(s, e.Message);
    }

    [Fact]
    public void Bad_configs_and_checkpoints_are_refused_in_one_line()
    {
        using var tmp = new TempDir();
        // A router whose rows do not match the experts.
        AssertRefused(Edited(tmp, "mixtral", c => c["num_local_experts"] = 3), "block_sparse_moe.gate.weight", "[4, 64]", "[3, 64]");
        AssertRefused(Edited(tmp, "qwen3_moe", tensors: w =>
        {
            var g = w["model.layers.0.mlp.gate.weight"];
            w["model.layers.0.mlp.gate.weight"] = g.narrow(0, 0, 7).clone();
        }), "model.layers.0.mlp.gate.weight", "[7, 64]", "[8, 64]");
        // More stored experts than the config's (their router rows would be missing).
        AssertRefused(Edited(tmp, "mixtral", tensors: w =>
        {
            foreach (var n in new[] { "w1", "w2", "w3" }) w[$"model.layers.1.block_sparse_moe.experts.4.{n}.weight"] = w[$"model.layers.1.block_sparse_moe.experts.0.{n}.weight"].clone();
        }), "num_local_experts is 4", "experts.4.");
        // Router fields.
        AssertRefused(Edited(tmp, "mixtral", c => c["num_experts_per_tok"] = 5), "num_experts_per_tok", "5", "4 experts");
        AssertRefused(Edited(tmp, "mixtral", c => c["num_local_experts"] = 0), "num_local_experts");
        AssertRefused(Edited(tmp, "qwen3_moe", c => c["mlp_only_layers"] = new JsonArray(3)), "mlp_only_layers", "3");
        AssertRefused(Edited(tmp, "qwen3_moe", c => c["use_sliding_window"] = true), "use_sliding_window");
        AssertRefused(Edited(tmp, "qwen3_moe", c => c["hidden_act"] = "gelu"), "hidden_act");
        // A dense layer declared sparse: its experts are missing.
        AssertRefused(Edited(tmp, "qwen3_moe", c => c["mlp_only_layers"] = new JsonArray()), "model.layers.1.mlp.gate.weight");
        AssertRefused(Edited(tmp, "qwen3_moe", c => c["expert_intermediate_sizes"] = new JsonArray(new JsonArray(48), new JsonArray(), new JsonArray())), "expert_intermediate_sizes", "[0]", "8 widths");
    }
}
