using System.Text.Json.Nodes;
using LlmSnp.Evaluation;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// Qwen3, Gemma 2, Gemma 3 and Phi-3 forwards against the independent float64 references in tests/fixtures/golden-families
/// (HF semantics, full-precision logits): F32 within 1e-4, F64 within 1e-9.
/// </summary>
public class FamilyGoldenTests
{
    readonly Xunit.Abstractions.ITestOutputHelper _out;
    public FamilyGoldenTests(Xunit.Abstractions.ITestOutputHelper output) { _out = output; }

    internal static string Fixture(string name) => Repo.Fixture(Path.Combine("golden-families", name));

    [Theory]
    [InlineData("qwen3", "qwen3", ScalarType.Float32, 1e-4)]
    [InlineData("qwen3", "qwen3", ScalarType.Float64, 1e-9)]
    [InlineData("gemma2", "gemma", ScalarType.Float32, 1e-4)]
    [InlineData("gemma2", "gemma", ScalarType.Float64, 1e-9)]
    [InlineData("gemma3_text", "gemma", ScalarType.Float32, 1e-4)]
    [InlineData("gemma3_text", "gemma", ScalarType.Float64, 1e-9)]
    [InlineData("phi3-mini", "phi3", ScalarType.Float32, 1e-4)]
    [InlineData("phi3-mini", "phi3", ScalarType.Float64, 1e-9)]
    [InlineData("phi4-mini", "phi3", ScalarType.Float32, 1e-4)]
    [InlineData("phi4-mini", "phi3", ScalarType.Float64, 1e-9)]
    public void Forward_matches_the_float64_golden_logits(string fixture, string family, ScalarType dtype, double tol)
    {
        string dir = Fixture(fixture);
        var (ids, logits, nll) = GoldenFile.Read(dir);
        using var model = ModelFamilies.OpenLanguageModel(dir, CPU, dtype);
        Assert.Equal(family, model.Family);
        Assert.Empty(model.UnusedTensors);
        for (int s = 0; s < ids.Length; s++)
        {
            using var input = torch.tensor(ids[s], new long[] { 1, ids[s].Length });
            using var got = LlamaTests.Forward(model, input).squeeze(0).to(ScalarType.Float64);
            using var want = torch.tensor(logits[s].SelectMany(x => x).ToArray(), new long[] { logits[s].Length, logits[s][0].Length }, ScalarType.Float64);
            double maxAbs = (got - want).abs().max().item<double>();
            _out.WriteLine($"{fixture} {dtype} seq {s}: max |Δlogit| {maxAbs:E2}");
            Assert.True(maxAbs < tol, $"{fixture} {dtype} seq {s}: max |Δlogit| = {maxAbs:G3} ≥ {tol}");
            var ppl = Perplexity.Evaluate(model, ids[s].Select(x => (int)x).ToArray(), ids[s].Length, null, "golden");
            // The perplexity protocol takes its softmax in F32 whatever the model's dtype.
            Assert.InRange(ppl.FirstWindowNll, nll[s] - 1e-5, nll[s] + 1e-5);
        }
    }

    /// <summary>A fixture's weights with config fields edited (to switch one feature off or on).</summary>
    internal static string WithConfig(TempDir tmp, string fixture, Action<JsonObject> edit, string name = "edited")
    {
        string dir = tmp.Sub(name);
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(Fixture(fixture), "model.safetensors"), Path.Combine(dir, "model.safetensors"));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixture(fixture), "config.json")))!.AsObject();
        edit(cfg);
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        return dir;
    }

    /// <summary>
    /// 40 tokens through the KV cache in uneven pieces equal the full forward: Gemma's window of 6 (on its sliding layers)
    /// is crossed many times, Gemma 2's soft-caps and Gemma 3's two RoPE bases act on cached keys.
    /// </summary>
    [Theory]
    [InlineData("qwen3")]
    [InlineData("gemma2")]
    [InlineData("gemma3_text")]
    [InlineData("phi3-mini")]
    public void Cached_logits_equal_the_full_forward(string fixture)
    {
        using var ids = torch.randint(3, 512, new long[] { 1, 40 }, generator: new torch.Generator(17));
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.Float64 })
            using (var model = ModelFamilies.OpenLanguageModel(Fixture(fixture), CPU, dtype)) GenerationTests.AssertCachedEqualsFull(model, ids, fixture);
    }

    /// <summary>The sliding window is in force in both paths: the same weights with a window past the sequence give other logits from position 6 on, the same before.</summary>
    [Theory]
    [InlineData("gemma2")]
    [InlineData("gemma3_text")]
    public void The_sliding_window_changes_only_positions_past_it(string fixture)
    {
        using var tmp = new TempDir();
        string wide = WithConfig(tmp, fixture, c => c["sliding_window"] = 4096);
        using var ids = torch.randint(3, 512, new long[] { 1, 24 }, generator: new torch.Generator(5));
        using var a = ModelFamilies.OpenLanguageModel(Fixture(fixture), CPU, ScalarType.Float64);
        using var b = ModelFamilies.OpenLanguageModel(wide, CPU, ScalarType.Float64);
        using var la = LlamaTests.Forward(a, ids);
        using var lb = LlamaTests.Forward(b, ids);
        Assert.True((la.narrow(1, 0, 6) - lb.narrow(1, 0, 6)).abs().max().item<double>() < 1e-12);
        Assert.True((la.narrow(1, 6, 18) - lb.narrow(1, 6, 18)).abs().max().item<double>() > 1e-3);
        using var ca = GenerationTests.CachedLogits(a, ids);
        Assert.True((ca - la).abs().max().item<double>() < 1e-10);
        // An explicit null window leaves the sliding layers unwindowed (HF's None), unlike an absent one (4096).
        using var c = ModelFamilies.OpenLanguageModel(WithConfig(tmp, fixture, cfg => cfg["sliding_window"] = null, "null-window"), CPU, ScalarType.Float64);
        using var lc = LlamaTests.Forward(c, ids);
        Assert.True((lc - lb).abs().max().item<double>() < 1e-12);
    }
}
