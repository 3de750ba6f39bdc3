using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// One ViT/DeiT encoder layer (HF `ViTLayer`, timm `Block`): pre-LayerNorm, bidirectional multi-head
/// attention with biases, exact-GELU MLP. In timm layout the fused `attn.qkv` is split into q, k, v on
/// load (so heads can be pruned row by row) and fused again on write.
/// </summary>
public sealed class VitBlock : PrunableBlock
{
    /// <summary>The tensors of a layer by what they are, HF name and timm name (q/k/v: parts of timm's fused qkv).</summary>
    public static readonly (string Hf, string Timm)[] Names =
    {
        ("layernorm_before.weight", "norm1.weight"), ("layernorm_before.bias", "norm1.bias"),
        ("attention.attention.query.weight", QkvPart + "q.weight"), ("attention.attention.query.bias", QkvPart + "q.bias"),
        ("attention.attention.key.weight", QkvPart + "k.weight"), ("attention.attention.key.bias", QkvPart + "k.bias"),
        ("attention.attention.value.weight", QkvPart + "v.weight"), ("attention.attention.value.bias", QkvPart + "v.bias"),
        ("attention.output.dense.weight", "attn.proj.weight"), ("attention.output.dense.bias", "attn.proj.bias"),
        ("layernorm_after.weight", "norm2.weight"), ("layernorm_after.bias", "norm2.bias"),
        ("intermediate.dense.weight", "mlp.fc1.weight"), ("intermediate.dense.bias", "mlp.fc1.bias"),
        ("output.dense.weight", "mlp.fc2.weight"), ("output.dense.bias", "mlp.fc2.bias"),
    };

    /// <summary>Marks the q/k/v parts of timm's fused `attn.qkv`: never a checkpoint name.</summary>
    public const string QkvPart = "attn.qkv:";

    /// <summary>Shapes of <see cref="Names"/> for attention width <paramref name="a"/>, MLP <paramref name="f"/>, model width <paramref name="h"/>.</summary>
    public static long[][] Shapes(long a, long f, long h) => new[]
    {
        new[] { h }, new[] { h }, new[] { a, h }, new[] { a }, new[] { a, h }, new[] { a }, new[] { a, h }, new[] { a },
        new[] { h, a }, new[] { h }, new[] { h }, new[] { h }, new[] { f, h }, new[] { f }, new[] { h, f }, new[] { h },
    };

    public static long ParameterCount(long a, long f, long h) => Shapes(a, f, h).Sum(s => s.Aggregate(1L, (x, y) => x * y));

    readonly string _p;
    readonly bool _timm;
    readonly int _hidden, _headDim;
    readonly double _eps;
    readonly string[] _n;   // local names of this layout, in Names order

    public VitBlock(string prefix, bool timm, int hidden, int headDim, double eps, string layerName, Dictionary<string, Tensor> tensors)
        : base(tensors, Maps(prefix, LocalNames(timm), layerName, headDim))
    {
        _p = prefix; _timm = timm; _hidden = hidden; _headDim = headDim; _eps = eps; _n = LocalNames(timm);
    }

    public static string[] LocalNames(bool timm) => Names.Select(n => timm ? n.Timm : n.Hf).ToArray();

    static UnitMap[] Maps(string p, string[] n, string layerName, int headDim) => new[]
    {
        new UnitMap($"{layerName}.attention", NodeKind.Heads, headDim,
            new[] { new Producer(p + n[2], p + n[3]), new Producer(p + n[4], p + n[5]), new Producer(p + n[6], p + n[7]) }, p + n[8], p + n[9]),
        new UnitMap($"{layerName}.mlp", NodeKind.Mlp, 1, new[] { new Producer(p + n[12], p + n[13]) }, p + n[14], p + n[15]),
    };

    Tensor T(int k) => W[_p + _n[k]];

    Tensor LayerNorm(Tensor x, int k) => F.layer_norm(x, new long[] { _hidden }, T(k), T(k + 1), _eps);

    public override Tensor Activations(int layer, Tensor input)
    {
        using var scope = NewDisposeScope();
        if (layer == 0)
            return Attention.MultiHead(LayerNorm(input, 0), T(2), T(3), T(4), T(5), T(6), T(7), _headDim, causal: false).MoveToOuterDisposeScope();
        return F.gelu(F.linear(LayerNorm(input, 10), T(12), T(13))).MoveToOuterDisposeScope();   // gelu: exact (erf)
    }

    public override Tensor Residual(int layer, Tensor input, Tensor activations)
    {
        using var scope = NewDisposeScope();
        var (w, b) = Consumer(layer);
        return (input + F.linear(activations, w, b)).MoveToOuterDisposeScope();
    }

    protected override IEnumerable<(string Name, Tensor Tensor)> ToCheckpoint(IReadOnlyDictionary<string, Tensor> tensors)
    {
        var named = tensors.Where(kv => !kv.Key.Contains(QkvPart)).Select(kv => (kv.Key, kv.Value)).ToList();
        if (_timm)
        {
            Tensor Part(string x) => tensors[_p + QkvPart + x];
            named.Add((_p + "attn.qkv.weight", torch.cat(new[] { Part("q.weight"), Part("k.weight"), Part("v.weight") }, 0)));
            named.Add((_p + "attn.qkv.bias", torch.cat(new[] { Part("q.bias"), Part("k.bias"), Part("v.bias") }, 0)));
        }
        return named;
    }
}
