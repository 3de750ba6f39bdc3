using System.Text.Json.Nodes;
using LlmSnp.Evaluation;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// The Phi-3 family (Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini): the forward against float64 references (fused
/// projections, partial rotary, longrope short and long tables with their attention factor), bad input.
/// </summary>
public class Phi3Tests
{
    internal static string Phi3Mini => Repo.Fixture("golden-families/phi3-mini");
    internal static string Phi4Mini => Repo.Fixture("golden-families/phi4-mini");

    /// <summary>The goldens are unrounded float64 logits: F64 within 1e-9, F32 within 1e-4.</summary>
    [Theory]
    [InlineData("phi3-mini", ScalarType.Float32, 1e-4)]
    [InlineData("phi3-mini", ScalarType.Float64, 1e-9)]
    [InlineData("phi4-mini", ScalarType.Float32, 1e-4)]
    [InlineData("phi4-mini", ScalarType.Float64, 1e-9)]
    public void Forward_matches_independent_float64_reference(string fixture, ScalarType dtype, double tol)
    {
        string dir = Repo.Fixture("golden-families/" + fixture);
        var (ids, logits, nll) = ModelTests.Golden(dir);
        using var model = ModelFamilies.OpenLanguageModel(dir, CPU, dtype);
        Assert.Equal("phi3", model.Family);
        Assert.Empty(model.UnusedTensors);
        for (int s = 0; s < ids.Length; s++)
        {
            using var input = torch.tensor(ids[s], new long[] { 1, ids[s].Length });
            using var got = LlamaTests.Forward(model, input).squeeze(0).to(ScalarType.Float64);
            using var want = torch.tensor(logits[s].SelectMany(x => x).ToArray(), new long[] { logits[s].Length, logits[s][0].Length }, ScalarType.Float64);
            double maxAbs = (got - want).abs().max().item<double>();
            Assert.True(maxAbs < tol, $"{fixture} seq {s}: max |Δlogit| = {maxAbs:G3} ≥ {tol}");
            var ppl = Perplexity.Evaluate(model, ids[s].Select(x => (int)x).ToArray(), ids[s].Length, null, "golden");
            Assert.InRange(ppl.FirstWindowNll, nll[s] - 1e-5, nll[s] + 1e-5);   // the evaluator reports it in float32
        }
    }
}
