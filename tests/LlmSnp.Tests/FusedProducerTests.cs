using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// Fused producers (Phi-3's qkv_proj and gate_up_proj): the surgery on one tensor holding q, k, v (or gate, up) as
/// consecutive segments must equal the surgery on the separate tensors, concatenated — kept rows, padded copies,
/// parameter counts and norms alike — and keep the tensor fused.
/// </summary>
public class FusedProducerTests
{
    const int Hidden = 12, HeadDim = 4, QueriesPerKv = 2, KvHeads = 3, Ffn = 10;

    /// <summary>A block with only the surgery (no forward is needed to test it).</summary>
    sealed class SurgeryBlock : PrunableBlock
    {
        public SurgeryBlock(Dictionary<string, Tensor> w, IReadOnlyList<UnitMap> maps, IReadOnlyDictionary<string, long[]>? fused = null) : base(w, maps, fused) { }
        public override Tensor Activations(int layer, Tensor input) => throw new NotSupportedException();
        public override Tensor Residual(int layer, Tensor input, Tensor activations) => throw new NotSupportedException();
        public long[] Segments(string name) => SegmentRows(name);
    }

    static Dictionary<string, Tensor> Separate(Generator g) => new(StringComparer.Ordinal)
    {
        ["q.weight"] = randn(new long[] { KvHeads * QueriesPerKv * HeadDim, Hidden }, ScalarType.Float64, generator: g),
        ["k.weight"] = randn(new long[] { KvHeads * HeadDim, Hidden }, ScalarType.Float64, generator: g),
        ["v.weight"] = randn(new long[] { KvHeads * HeadDim, Hidden }, ScalarType.Float64, generator: g),
        ["o.weight"] = randn(new long[] { Hidden, KvHeads * QueriesPerKv * HeadDim }, ScalarType.Float64, generator: g),
        ["gate.weight"] = randn(new long[] { Ffn, Hidden }, ScalarType.Float64, generator: g),
        ["up.weight"] = randn(new long[] { Ffn, Hidden }, ScalarType.Float64, generator: g),
        ["down.weight"] = randn(new long[] { Hidden, Ffn }, ScalarType.Float64, generator: g),
    };

    static UnitMap[] Maps(bool fused) => new[]
    {
        new UnitMap("attn", NodeKind.Heads, QueriesPerKv * HeadDim, fused
            ? new[] { new Producer("qkv.weight", null, 0), new Producer("qkv.weight", null, 1), new Producer("qkv.weight", null, 2) }
            : new[] { new Producer("q.weight", null), new Producer("k.weight", null), new Producer("v.weight", null) },
            "o.weight", "o.bias"),
        new UnitMap("mlp", NodeKind.Mlp, 1, fused
            ? new[] { new Producer("gate_up.weight", null, 0), new Producer("gate_up.weight", null, 1) }
            : new[] { new Producer("gate.weight", null), new Producer("up.weight", null) },
            "down.weight", "down.bias"),
    };

    static (SurgeryBlock Separate, SurgeryBlock Fused) Pair()
    {
        var s = Separate(new Generator(5));
        var f = new Dictionary<string, Tensor>(StringComparer.Ordinal)
        {
            ["qkv.weight"] = cat(new[] { s["q.weight"], s["k.weight"], s["v.weight"] }),
            ["o.weight"] = s["o.weight"].clone(),
            ["gate_up.weight"] = cat(new[] { s["gate.weight"], s["up.weight"] }),
            ["down.weight"] = s["down.weight"].clone(),
        };
        var parts = new Dictionary<string, long[]>
        {
            ["qkv.weight"] = new long[] { KvHeads * QueriesPerKv * HeadDim, KvHeads * HeadDim, KvHeads * HeadDim },
            ["gate_up.weight"] = new long[] { Ffn, Ffn },
        };
        return (new SurgeryBlock(s, Maps(false)), new SurgeryBlock(f, Maps(true), parts));
    }

    static Dictionary<string, Tensor> Dict(IEnumerable<(string Name, Tensor Tensor)> ts) => ts.ToDictionary(x => x.Name, x => x.Tensor);

    static void Same(Tensor a, Tensor b) => Assert.True(a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>(), $"[{string.Join(",", a.shape)}] vs [{string.Join(",", b.shape)}]");

    [Fact]
    public void Fused_segments_are_pruned_like_the_separate_tensors_and_stay_fused()
    {
        var (sep, fus) = Pair();
        using (sep) using (fus)
        {
            for (int j = 0; j < 2; j++)
            {
                Assert.Equal(sep.NodeLayers[j], fus.NodeLayers[j]);   // units, groups, parameters per group
                Same(sep.ProducerSquaredNorms(j), fus.ProducerSquaredNorms(j));
            }
            // Keep K/V groups 0 and 2 (units of group g: g·8 .. g·8+7) and MLP neurons 1, 4, 5, 9, with new consumers.
            long gs = QueriesPerKv * HeadDim;
            long[] heads = new long[] { 0, 2 }.SelectMany(g => Enumerable.Range(0, (int)gs).Select(u => g * gs + u)).ToArray();
            long[] mlp = { 1, 4, 5, 9 };
            var g2 = new Generator(9);
            var o = randn(new long[] { Hidden, heads.Length }, ScalarType.Float64, generator: g2);
            var ob = randn(new long[] { Hidden }, ScalarType.Float64, generator: g2);
            var d = randn(new long[] { Hidden, mlp.Length }, ScalarType.Float64, generator: g2);
            foreach (var b in new[] { sep, fus })
            {
                b.Prune(0, heads, o, ob);
                b.Prune(1, mlp, d, null);
            }
            var s = Dict(sep.Tensors(ScalarType.Float64));
            var f = Dict(fus.Tensors(ScalarType.Float64));
            Assert.Equal(new[] { "qkv.weight", "o.weight", "gate_up.weight", "down.weight", "o.bias" }, f.Keys);
            Same(cat(new[] { s["q.weight"], s["k.weight"], s["v.weight"] }), f["qkv.weight"]);
            Same(cat(new[] { s["gate.weight"], s["up.weight"] }), f["gate_up.weight"]);
            Same(s["o.weight"], f["o.weight"]);
            Assert.Equal(new long[] { 2 * gs, 2 * HeadDim, 2 * HeadDim }, fus.Segments("qkv.weight"));
            Assert.Equal(new long[] { 4, 4 }, fus.Segments("gate_up.weight"));
            Assert.Equal(new long[] { 0, 2 }, fus.KeptGroups(0));

            // The padded copy: kept rows back at their original places inside each segment.
            var sp = Dict(sep.PaddedTensors(ScalarType.Float64));
            var fp = Dict(fus.PaddedTensors(ScalarType.Float64));
            Same(cat(new[] { sp["q.weight"], sp["k.weight"], sp["v.weight"] }), fp["qkv.weight"]);
            Same(cat(new[] { sp["gate.weight"], sp["up.weight"] }), fp["gate_up.weight"]);
            Assert.Equal(new long[] { 3 * gs + 6 * HeadDim, Hidden }, fp["qkv.weight"].shape);

            // A second prune of the already pruned layer works on the new segment sizes.
            for (int j = 0; j < 2; j++) Assert.Equal(sep.NodeLayers[j], fus.NodeLayers[j]);
            long[] again = Enumerable.Range(0, (int)gs).Select(u => (long)u).ToArray();   // keep the first remaining group (original 0)
            var o2 = randn(new long[] { Hidden, gs }, ScalarType.Float64, generator: g2);
            sep.Prune(0, again, o2, null);
            fus.Prune(0, again, o2, null);
            s = Dict(sep.Tensors(ScalarType.Float64));
            f = Dict(fus.Tensors(ScalarType.Float64));
            Same(cat(new[] { s["q.weight"], s["k.weight"], s["v.weight"] }), f["qkv.weight"]);
            Assert.Equal(new long[] { 0 }, fus.KeptGroups(0));
            sp = Dict(sep.PaddedTensors(ScalarType.Float64));
            fp = Dict(fus.PaddedTensors(ScalarType.Float64));
            Same(cat(new[] { sp["q.weight"], sp["k.weight"], sp["v.weight"] }), fp["qkv.weight"]);
        }
    }

    [Fact]
    public void Fused_parts_that_do_not_add_up_to_the_tensor_are_refused_naming_it()
    {
        var w = Separate(new Generator(1));
        var f = new Dictionary<string, Tensor>(StringComparer.Ordinal)
        {
            ["qkv.weight"] = cat(new[] { w["q.weight"], w["k.weight"], w["v.weight"] }), ["o.weight"] = w["o.weight"],
            ["gate_up.weight"] = cat(new[] { w["gate.weight"], w["up.weight"] }), ["down.weight"] = w["down.weight"],
        };
        var parts = new Dictionary<string, long[]> { ["qkv.weight"] = new long[] { 24, 12, 8 }, ["gate_up.weight"] = new long[] { Ffn, Ffn } };
        var e = Assert.Throws<LlmSnpException>(() => new SurgeryBlock(f, Maps(true), parts));
        Assert.Contains("qkv.weight", e.Message);
        Assert.Contains("48 rows", e.Message);
    }
}
