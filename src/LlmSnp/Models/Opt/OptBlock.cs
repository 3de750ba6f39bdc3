using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// One OPT decoder layer (HF `OPTDecoderLayer`): pre- or post-LayerNorm, causal multi-head attention
/// with biases, ReLU MLP `fc1` → `fc2`. Node layers: the heads (input of `out_proj`), the `fc1` neurons.
/// </summary>
public sealed class OptBlock : PrunableBlock, ICachedBlock
{
    /// <summary>The layer's tensor names after `layers.{i}.`, in checkpoint order.</summary>
    public static readonly string[] Names =
    {
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
        "final_layer_norm.weight", "final_layer_norm.bias",
    };

    /// <summary>Shapes of <see cref="Names"/> for attention width <paramref name="a"/> (heads × head_dim), MLP <paramref name="f"/>, model width <paramref name="h"/>.</summary>
    public static long[][] Shapes(long a, long f, long h) => new[]
    {
        new[] { a, h }, new[] { a }, new[] { a, h }, new[] { a }, new[] { a, h }, new[] { a }, new[] { h, a }, new[] { h },
        new[] { h }, new[] { h }, new[] { f, h }, new[] { f }, new[] { h, f }, new[] { h }, new[] { h }, new[] { h },
    };

    public static long ParameterCount(long a, long f, long h) => Shapes(a, f, h).Sum(s => s.Aggregate(1L, (x, y) => x * y));

    readonly string _p;
    readonly int _hidden, _headDim;
    readonly bool _preLayerNorm;

    public OptBlock(string prefix, int hidden, int headDim, bool preLayerNorm, int index, Dictionary<string, Tensor> tensors)
        : base(tensors, new[]
        {
            new UnitMap($"layers.{index}.self_attn", NodeKind.Heads, headDim,
                new[] { P(prefix, "self_attn.q_proj"), P(prefix, "self_attn.k_proj"), P(prefix, "self_attn.v_proj") },
                prefix + "self_attn.out_proj.weight", prefix + "self_attn.out_proj.bias"),
            new UnitMap($"layers.{index}.fc1", NodeKind.Mlp, 1, new[] { P(prefix, "fc1") }, prefix + "fc2.weight", prefix + "fc2.bias"),
        })
    {
        _p = prefix; _hidden = hidden; _headDim = headDim; _preLayerNorm = preLayerNorm;
    }

    static Producer P(string prefix, string linear) => new(prefix + linear + ".weight", prefix + linear + ".bias");

    Tensor T(string name) => W[_p + name];

    Tensor LayerNorm(Tensor x, string norm) => F.layer_norm(x, new long[] { _hidden }, T(norm + ".weight"), T(norm + ".bias"), OptModel.LayerNormEps);

    public override Tensor Activations(int layer, Tensor input)
    {
        using var scope = NewDisposeScope();
        if (layer == 0) return HeadOutputs(input, null, 0).MoveToOuterDisposeScope();
        var z = F.linear(_preLayerNorm ? LayerNorm(input, "final_layer_norm") : input, T("fc1.weight"), T("fc1.bias"));
        return z.relu_().MoveToOuterDisposeScope();   // in place on the fresh fc1 output
    }

    /// <summary>The heads' outputs (node layer 0) of the whole sequence, or with a cache of the tokens from <paramref name="position"/>.</summary>
    Tensor HeadOutputs(Tensor input, KvCache? cache, int position, Tensor? attend = null)
    {
        var x = _preLayerNorm ? LayerNorm(input, "self_attn_layer_norm") : input;
        return Attention.MultiHead(x, T("self_attn.q_proj.weight"), T("self_attn.q_proj.bias"), T("self_attn.k_proj.weight"), T("self_attn.k_proj.bias"),
            T("self_attn.v_proj.weight"), T("self_attn.v_proj.bias"), _headDim, causal: true, cache, position, attend);
    }

    /// <summary>The block on packed rows: attention as the caller's mask allows (OPT's positions were added at embedding).</summary>
    public Tensor ForwardMasked(Tensor hidden, Tensor positions, Tensor attend)
    {
        using var scope = NewDisposeScope();
        var h = Residual(0, hidden, HeadOutputs(hidden, null, 0, attend));
        return Residual(1, h, Activations(1, h)).MoveToOuterDisposeScope();
    }

    /// <summary>The block on new tokens only: the cached attention, then the same residuals and MLP as <see cref="PrunableBlock.Forward"/>.</summary>
    public Tensor Step(Tensor hidden, KvCache cache, int position)
    {
        using var scope = NewDisposeScope();
        var h = Residual(0, hidden, HeadOutputs(hidden, cache, position));
        return Residual(1, h, Activations(1, h)).MoveToOuterDisposeScope();
    }

    public override Tensor Residual(int layer, Tensor input, Tensor activations)
    {
        using var scope = NewDisposeScope();
        var (w, b) = Consumer(layer);
        var h = input + F.linear(activations, w, b);
        // Post-LN (OPT-350m): the norm follows each residual add.
        if (!_preLayerNorm) h = LayerNorm(h, layer == 0 ? "self_attn_layer_norm" : "final_layer_norm");
        return h.MoveToOuterDisposeScope();
    }
}
