using System.Text.Json;
using LlmSnp.Evaluation;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>The OPT family: its forward against independent float64 references, streamed evaluation, causality, tied heads, half-precision storage.</summary>
public class OptTests
{
    [Theory]
    [InlineData("opt-tiny-pre", ScalarType.Float32, 1e-4)]
    [InlineData("opt-tiny-post", ScalarType.Float32, 1e-4)]
    [InlineData("opt-tiny-pre-f16", ScalarType.Float32, 1e-4)]
    [InlineData("opt-tiny-pre", ScalarType.Float64, 1e-6)]
    [InlineData("opt-tiny-post", ScalarType.Float64, 1e-6)]
    [InlineData("opt-tiny-pre-f16", ScalarType.Float64, 1e-6)]
    public void Forward_matches_independent_float64_reference(string fixture, ScalarType dtype, double tol)
    {
        string dir = Repo.Fixture(Path.Combine("golden-opt", fixture));
        var (ids, logits, nll) = GoldenFile.Read(dir);
        using var model = new OptModel(dir, CPU, dtype);
        for (int s = 0; s < ids.Length; s++)
        {
            using var input = torch.tensor(ids[s], new long[] { 1, ids[s].Length });
            using var got = model.ForwardAllInMemory(input).squeeze(0).to(ScalarType.Float64);
            using var want = torch.tensor(logits[s].SelectMany(x => x).ToArray(), new long[] { logits[s].Length, logits[s][0].Length }, ScalarType.Float64);
            double maxAbs = (got - want).abs().max().item<double>();
            Assert.True(maxAbs < tol, $"{fixture} seq {s}: max |Δlogit| = {maxAbs:G3} ≥ {tol}");
            // Mean next-token NLL through the perplexity evaluator (streamed path).
            var r = Perplexity.Evaluate(model, ids[s].Select(x => (int)x).ToArray(), ids[s].Length, null, "golden");
            Assert.InRange(r.FirstWindowNll, nll[s] - 1e-4, nll[s] + 1e-4);
        }
    }

    /// <summary>
    /// The bundled trained OPT against NumPy float64 logits of its stored F16 weights
    /// (tools/reference/opt_golden.py): real text, the real 50272-token vocabulary, 24 positions.
    /// </summary>
    [Theory]
    [InlineData("opt-tiny-c4-v2", ScalarType.Float64, 1e-9)]
    [InlineData("opt-tiny-c4-v2", ScalarType.Float32, 2e-4)]
    public void Bundled_trained_model_matches_its_numpy_reference(string name, ScalarType dtype, double tol)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Repo.Fixture($"{name}-golden.json")));
        var r = doc.RootElement;
        var cols = r.GetProperty("columns").EnumerateArray().Select(x => x.GetInt64()).ToArray();
        using var model = new OptModel(Path.Combine(Repo.Root, "models", name), CPU, dtype);
        using var colIdx = torch.tensor(cols);
        int s = 0;
        foreach (var seq in r.GetProperty("input_ids").EnumerateArray())
        {
            var ids = seq.EnumerateArray().Select(x => x.GetInt64()).ToArray();
            var want = r.GetProperty("logits")[s].EnumerateArray().SelectMany(t => t.EnumerateArray().Select(x => x.GetDouble())).ToArray();
            using var input = torch.tensor(ids, new long[] { 1, ids.Length });
            using var logits = model.ForwardAllInMemory(input).squeeze(0).to(ScalarType.Float64);
            using var got = logits.index_select(1, colIdx);
            using var expected = torch.tensor(want, new long[] { ids.Length, cols.Length }, ScalarType.Float64);
            double maxAbs = (got - expected).abs().max().item<double>();
            Assert.True(maxAbs < tol, $"{name} seq {s}: max |Δlogit| = {maxAbs:G3} ≥ {tol}");
            double nll = nn.functional.cross_entropy(logits.narrow(0, 0, ids.Length - 1), input[0].narrow(0, 1, ids.Length - 1)).item<double>();
            Assert.InRange(nll, r.GetProperty("nll")[s].GetDouble() - 10 * tol, r.GetProperty("nll")[s].GetDouble() + 10 * tol);
            s++;
        }
    }

    [Fact]
    public void Streamed_evaluation_equals_all_in_memory_forward()
    {
        using var tmp = new TempDir();
        string dir = new TinyOpt { Layers = 3 }.Write(tmp.Sub("m"));
        using var model = new OptModel(dir, CPU, ScalarType.Float64);
        var rng = new Random(5);
        int seq = 16, windows = 5;
        var ids = Enumerable.Range(0, seq * windows + 7).Select(_ => rng.Next(3, 96)).ToArray();
        var r = Perplexity.Evaluate(model, ids, seq, null, "x");
        Assert.Equal(windows, r.Windows);
        double sum = 0;
        for (int w = 0; w < windows; w++)
        {
            using var x = torch.tensor(ids.Skip(w * seq).Take(seq).Select(i => (long)i).ToArray(), new long[] { 1, seq });
            using var logits = model.ForwardAllInMemory(x).squeeze(0);
            sum += nn.functional.cross_entropy(logits.narrow(0, 0, seq - 1), x[0].narrow(0, 1, seq - 1)).item<double>();
        }
        double want = Math.Exp(sum / windows);   // the evaluator's softmax runs in float32
        Assert.InRange(r.Perplexity, want * (1 - 1e-6), want * (1 + 1e-6));
    }

    [Fact]
    public void Changing_a_later_token_never_changes_earlier_logits()
    {
        using var tmp = new TempDir();
        string dir = new TinyOpt().Write(tmp.Sub("m"));
        using var model = new OptModel(dir, CPU, ScalarType.Float64);
        var a = new long[] { 2, 10, 11, 12, 13, 14, 15, 16 };
        var b = (long[])a.Clone();
        b[6] = 50;
        using var la = model.ForwardAllInMemory(torch.tensor(a, new long[] { 1, 8 }));
        using var lb = model.ForwardAllInMemory(torch.tensor(b, new long[] { 1, 8 }));
        Assert.Equal(0.0, (la.narrow(1, 0, 6) - lb.narrow(1, 0, 6)).abs().max().item<double>());
        Assert.True((la.narrow(1, 6, 2) - lb.narrow(1, 6, 2)).abs().max().item<double>() > 1e-6);
    }

    [Fact]
    public void Untied_head_equal_to_the_embedding_gives_the_tied_logits()
    {
        using var tmp = new TempDir();
        string tied = new TinyOpt { Prefix = "decoder." }.Write(tmp.Sub("tied"));
        string untied = new TinyOpt { Tied = false, Edit = t => t["lm_head.weight"] = t["model.decoder.embed_tokens.weight"].clone() }.Write(tmp.Sub("untied"));
        using var m1 = new OptModel(tied, CPU, ScalarType.Float64);
        using var m2 = new OptModel(untied, CPU, ScalarType.Float64);
        using var x = torch.tensor(new long[] { 2, 5, 9, 33, 70 }, new long[] { 1, 5 });
        Assert.Equal(0.0, (m1.ForwardAllInMemory(x) - m2.ForwardAllInMemory(x)).abs().max().item<double>(), 12);
    }

    [Theory]
    [InlineData(ScalarType.Float16, 2e-2)]
    [InlineData(ScalarType.BFloat16, 1e-1)]
    public void Half_precision_storage_stays_close_to_float32(ScalarType stored, double tol)
    {
        using var tmp = new TempDir();
        string f32 = new TinyOpt().Write(tmp.Sub("f32"));
        string half = new TinyOpt { DType = stored }.Write(tmp.Sub("half"));
        using var m1 = new OptModel(f32);
        using var m2 = new OptModel(half);
        Assert.Equal(stored, m2.StoredDType);
        using var x = torch.tensor(new long[] { 2, 5, 9, 33, 70, 4 }, new long[] { 1, 6 });
        using var l1 = m1.ForwardAllInMemory(x);
        using var l2 = m2.ForwardAllInMemory(x);
        double rel = ((l1 - l2).abs().max() / l1.abs().max()).item<float>();
        Assert.True(rel < tol, $"relative logit difference {rel}");
        Assert.True(rel > 0, "half-precision weights should differ from float32 at all");
    }

    [Fact]
    public void All_zero_weights_give_perplexity_equal_to_the_vocabulary_size()
    {
        using var tmp = new TempDir();
        string dir = new TinyOpt { Edit = t => { foreach (var v in t.Values) v.zero_(); } }.Write(tmp.Sub("zero"));
        using var model = new OptModel(dir);
        var ids = Enumerable.Range(0, 64).Select(i => 3 + i % 90).ToArray();
        var r = Perplexity.Evaluate(model, ids, 32, null, "x");
        Assert.Equal(96.0, r.Perplexity, 3);
    }

    [Fact]
    public void Post_layer_norm_with_projections_runs_and_is_causal()
    {
        using var tmp = new TempDir();
        string dir = new TinyOpt { PreLayerNorm = false, ProjDim = 16, Tied = false, Prefix = "decoder." }.Write(tmp.Sub("post"));
        using var model = new OptModel(dir, CPU, ScalarType.Float64);
        using var x = torch.tensor(new long[] { 2, 5, 9, 33 }, new long[] { 1, 4 });
        using var full = model.ForwardAllInMemory(x);
        using var prefix = model.ForwardAllInMemory(x.narrow(1, 0, 2));
        Assert.Equal(0.0, (full.narrow(1, 0, 2) - prefix).abs().max().item<double>(), 12);
    }
}
