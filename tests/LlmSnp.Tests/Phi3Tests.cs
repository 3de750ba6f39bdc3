using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Generation;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// What the golden logits (16 tokens, short factors) do not reach: longrope's long table past
/// original_max_position_embeddings (phi4-mini: 32), the cache recomputed where a sequence crosses it (HF 4.48
/// `Phi3ForCausalLM.prepare_inputs_for_generation`), and the LLaMA family's yarn and dynamic scalings.
/// </summary>
public class Phi3Tests
{
    static string Phi4Mini => FamilyGoldenTests.Fixture("phi4-mini");

    static JsonObject Scaling(JsonObject cfg) => cfg["rope_scaling"]!.AsObject();

    /// <summary>
    /// 40 tokens (past the original 32) rotate with the long factors and the attention factor √(1 + ln 8 / ln 32): the same
    /// weights with the long factors as short ones, an original context of 64 (no switch) and that attention factor stated
    /// give the same logits; with the short factors kept they differ. Under 32 tokens the long factors play no part.
    /// </summary>
    [Fact]
    public void Past_the_original_context_the_long_factors_rotate()
    {
        using var tmp = new TempDir();
        double attention = Math.Sqrt(1 + Math.Log(8) / Math.Log(32));
        string longAsShort = FamilyGoldenTests.WithConfig(tmp, "phi4-mini", c =>
        {
            var rs = Scaling(c);
            rs["short_factor"] = rs["long_factor"]!.DeepClone();
            rs["attention_factor"] = attention;
            c["original_max_position_embeddings"] = 64;
        }, "long-as-short");
        string shortOnly = FamilyGoldenTests.WithConfig(tmp, "phi4-mini", c => Scaling(c)["long_factor"] = Scaling(c)["short_factor"]!.DeepClone(), "short-only");
        using var ids = torch.randint(3, 512, new long[] { 1, 40 }, generator: new torch.Generator(3));
        using var a = ModelFamilies.OpenLanguageModel(Phi4Mini, CPU, ScalarType.Float64);
        using var b = ModelFamilies.OpenLanguageModel(longAsShort, CPU, ScalarType.Float64);
        using var c = ModelFamilies.OpenLanguageModel(shortOnly, CPU, ScalarType.Float64);
        using var la = LlamaTests.Forward(a, ids);
        using var lb = LlamaTests.Forward(b, ids);
        using var lc = LlamaTests.Forward(c, ids);
        Assert.True((la - lb).abs().max().ToDouble() < 1e-12);
        Assert.True((la - lc).abs().max().ToDouble() > 1e-3);
        using var shortIds = ids.narrow(1, 0, 32);
        using var sa = LlamaTests.Forward(a, shortIds);
        using var sc = LlamaTests.Forward(c, shortIds);
        Assert.True((sa - sc).abs().max().ToDouble() < 1e-12);
    }

    /// <summary>
    /// Decoding through the cache: positions before the switch are computed with the short factors (each step is a forward
    /// of the sequence so far, ≤ 32 tokens), and the step that crosses it recomputes the cache, so every later logit equals
    /// the full forward's.
    /// </summary>
    [Theory]
    [InlineData(ScalarType.Float64, 1e-10)]
    [InlineData(ScalarType.Float32, 2e-5)]
    public void The_cache_is_recomputed_where_a_sequence_crosses_the_switch(ScalarType dtype, double tol)
    {
        using var ids = torch.randint(3, 512, new long[] { 1, 40 }, generator: new torch.Generator(11));
        using var model = ModelFamilies.OpenLanguageModel(Phi4Mini, CPU, dtype);
        Assert.Equal(32, model.RecomputeCachePast);
        using var cached = GenerationTests.CachedLogits(model, ids);
        using var full = LlamaTests.Forward(model, ids);
        using var first = LlamaTests.Forward(model, ids.narrow(1, 0, 32));
        Assert.True((cached.narrow(1, 0, 32) - first).abs().max().ToDouble() < tol);
        Assert.True((cached.narrow(1, 32, 8) - full.narrow(1, 32, 8)).abs().max().ToDouble() < tol);
        Assert.True((cached.narrow(1, 0, 32) - full.narrow(1, 0, 32)).abs().max().ToDouble() > 1e-3);   // the switch matters
    }

    /// <summary>Packed rows whose shared context is read by one sequence past the switch and one before it cannot be computed in one pass.</summary>
    [Fact]
    public void Packed_rows_straddling_the_switch_are_refused()
    {
        using var tmp = new TempDir();
        string dir = FamilyGoldenTests.WithConfig(tmp, "phi4-mini", c => c["original_max_position_embeddings"] = 10);
        using var model = ModelFamilies.OpenLanguageModel(dir, CPU, ScalarType.Float64);
        // [shared 5 | A 7 | B 4]: shared + A has 12 tokens (long table), shared + B 9 (short).
        long[] pos = Enumerable.Range(0, 12).Select(i => (long)i).Concat(Enumerable.Range(5, 4).Select(i => (long)i)).ToArray();
        int[] seg = Enumerable.Range(0, 16).Select(i => i < 5 ? 0 : i < 12 ? 1 : 2).ToArray();
        var mask = new bool[16 * 16];
        for (int i = 0; i < 16; i++)
            for (int j = 0; j <= i; j++) mask[i * 16 + j] = seg[j] == 0 || seg[j] == seg[i];
        using var positions = torch.tensor(pos, new long[] { 1, 16 });
        using var attend = torch.tensor(mask, new long[] { 1, 16, 16 });
        using var h = model.EmbedAt(torch.randint(3, 500, new long[] { 1, 16 }, generator: new torch.Generator(2)), positions);
        using var block = model.LoadCachedBlock(0);
        var e = Assert.Throws<LlmSnpException>(() => block.ForwardMasked(h, positions, attend));
        Assert.Contains("longrope", e.Message);
    }

    /// <summary>
    /// HF 4.48 `_compute_yarn_parameters` with beta_fast = beta_slow = 1e9: both correction dims are negative, the ramp is 0
    /// everywhere and every frequency is kept, so yarn is plain RoPE with cos and sin × m, m = 0.1·ln(factor) + 1: the same
    /// as q_proj × m² without scaling (RoPE is linear in q).
    /// </summary>
    [Fact]
    public void Yarn_is_plain_rope_times_its_attention_factor_where_the_ramp_keeps_every_frequency()
    {
        using var tmp = new TempDir();
        const string fixture = "golden-llama/llama-gqa-untied";
        double m = 0.1 * Math.Log(4) + 1;
        string yarn = tmp.Sub("yarn"), scaledQ = tmp.Sub("scaled-q");
        foreach (var d in new[] { yarn, scaledQ }) Directory.CreateDirectory(d);
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(Repo.Fixture(fixture), "config.json")))!.AsObject();
        File.WriteAllText(Path.Combine(scaledQ, "config.json"), cfg.ToJsonString());
        cfg["rope_scaling"] = JsonNode.Parse("{\"rope_type\": \"yarn\", \"factor\": 4.0, \"beta_fast\": 1e9, \"beta_slow\": 1e9}");
        File.WriteAllText(Path.Combine(yarn, "config.json"), cfg.ToJsonString());
        File.Copy(Path.Combine(Repo.Fixture(fixture), "model.safetensors"), Path.Combine(yarn, "model.safetensors"));
        using (var r = new CheckpointReader(Repo.Fixture(fixture)))
            SafeTensorsWriter.WriteAll(scaledQ, r.Names.Select(n => (n, n.EndsWith("q_proj.weight") ? r.Read(n, ScalarType.Float64, CPU) * (m * m) : r.Read(n, ScalarType.Float64, CPU))).ToList());
        using var ids = torch.randint(3, 512, new long[] { 1, 24 }, generator: new torch.Generator(4));
        using var a = ModelFamilies.OpenLanguageModel(yarn, CPU, ScalarType.Float64);
        using var b = ModelFamilies.OpenLanguageModel(scaledQ, CPU, ScalarType.Float64);
        using var plain = ModelFamilies.OpenLanguageModel(Repo.Fixture(fixture), CPU, ScalarType.Float64);
        using var la = LlamaTests.Forward(a, ids);
        using var lb = LlamaTests.Forward(b, ids);
        using var lp = LlamaTests.Forward(plain, ids);
        Assert.True((la - lb).abs().max().ToDouble() < 1e-10);
        Assert.True((la - lp).abs().max().ToDouble() > 1e-3);
    }

    /// <summary>
    /// Qwen2.5's yarn (factor 4, θ 1e6, 32768 positions, head_dim 128): the fastest frequencies (turning more than 32 times
    /// over the context) are kept, the slowest (under once) divided by the factor, those between lie between; attention
    /// factor 0.1·ln 4 + 1.
    /// </summary>
    [Fact]
    public void Yarn_keeps_fast_frequencies_and_interpolates_slow_ones()
    {
        using var tmp = new TempDir();
        string dir = tmp.Sub("cfg");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), "{\"model_type\": \"qwen2\", \"max_position_embeddings\": 32768, \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}}");
        var rs = RopeScaling.From(ConfigFile.Load(dir), 32768);
        Assert.Equal(0.1 * Math.Log(4) + 1, rs.AttentionFactor, 15);
        const double theta = 1e6;
        var inv = rs.InverseFrequencies(128, theta);
        for (int i = 0; i < 64; i++)
        {
            double plain = Math.Pow(theta, -2.0 * i / 128), turns = 32768 * plain / (2 * Math.PI);
            if (turns > 32 * 1.5) Assert.Equal(plain, inv[i], 1e-15 * plain);
            else if (turns < 1 / 1.5) Assert.Equal(plain / 4, inv[i], 1e-15 * plain);
            else Assert.InRange(inv[i], plain / 4 * (1 - 1e-12), plain * (1 + 1e-12));
        }
    }

    /// <summary>HF's dynamic NTK rescales θ only for sequences longer than max_position_embeddings: up to it, plain RoPE.</summary>
    [Fact]
    public void Dynamic_scaling_within_max_positions_is_plain_rope()
    {
        using var tmp = new TempDir();
        string fixture = Repo.Fixture("golden-llama/llama-gqa-untied");
        string dir = tmp.Sub("dynamic");
        Directory.CreateDirectory(dir);
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(fixture, "config.json")))!.AsObject();
        cfg["rope_scaling"] = JsonNode.Parse("{\"rope_type\": \"dynamic\", \"factor\": 4.0}");
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        File.Copy(Path.Combine(fixture, "model.safetensors"), Path.Combine(dir, "model.safetensors"));
        using var ids = torch.randint(3, 512, new long[] { 1, 24 }, generator: new torch.Generator(4));
        using var a = ModelFamilies.OpenLanguageModel(dir, CPU, ScalarType.Float64);
        using var p = ModelFamilies.OpenLanguageModel(fixture, CPU, ScalarType.Float64);
        using var la = LlamaTests.Forward(a, ids);
        using var lp = LlamaTests.Forward(p, ids);
        Assert.True((la - lp).abs().max().ToDouble() < 1e-13);
    }
}
