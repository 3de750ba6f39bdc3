using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// One Qwen3 decoder layer (HF `Qwen3DecoderLayer`): x += o_proj(attention(RMSNorm(x))) with <see cref="Qwen3Attention"/>
/// (per-head q/k norms before RoPE), then x += down(silu(gate(h)) · up(h)) with h = RMSNorm(x). Node layers: the K/V groups
/// and the MLP neurons (row j of gate and up, column j of down).
/// </summary>
public sealed class Qwen3Block : PrunableBlock, ICachedBlock
{
    readonly string _p;
    readonly double _eps;
    readonly Qwen3Attention _attention;

    public Qwen3Block(string prefix, int index, Qwen3Config c, Rope rope, Dictionary<string, Tensor> tensors)
        : base(tensors, new[]
        {
            Qwen3Attention.Units(prefix, index, c.QueriesPerKv, c.HeadDim),
            new UnitMap($"layers.{index}.mlp", NodeKind.Mlp, 1,
                new[] { new Producer(prefix + "mlp.gate_proj.weight", null), new Producer(prefix + "mlp.up_proj.weight", null) },
                prefix + "mlp.down_proj.weight", prefix + "mlp.down_proj.bias"),
        })
    {
        _p = prefix; _eps = c.RmsNormEps;
        _attention = new Qwen3Attention(prefix, c.HeadDim, c.RmsNormEps, rope, c.Windows[index]);
    }

    /// <summary>The layer's tensors (names under its prefix) and shapes for layer <paramref name="i"/>'s widths.</summary>
    public static IEnumerable<(string Name, long[] Shape)> Tensors(Qwen3Config c, int i)
    {
        var w = c.Widths;
        foreach (var t in Qwen3Attention.Tensors(c.Hidden, w.Heads[i], w.KvHeads[i], c.HeadDim, c.AttentionBias)) yield return t;
        long h = c.Hidden, f = w.Intermediate[i];
        yield return ("mlp.gate_proj.weight", new[] { f, h });
        yield return ("mlp.up_proj.weight", new[] { f, h });
        yield return ("mlp.down_proj.weight", new[] { h, f });
        yield return ("input_layernorm.weight", new[] { h });
        yield return ("post_attention_layernorm.weight", new[] { h });
    }

    Tensor T(string name) => W[_p + name];

    public override Tensor Activations(int layer, Tensor input)
    {
        using var scope = NewDisposeScope();
        if (layer == 0) return _attention.Heads(Optional, Norms.Rms(input, T("input_layernorm.weight"), _eps)).MoveToOuterDisposeScope();
        var x = Norms.Rms(input, T("post_attention_layernorm.weight"), _eps);
        return F.silu(F.linear(x, T("mlp.gate_proj.weight")), inplace: true).mul_(F.linear(x, T("mlp.up_proj.weight"))).MoveToOuterDisposeScope();
    }

    public override Tensor Residual(int layer, Tensor input, Tensor activations)
    {
        using var scope = NewDisposeScope();
        var (w, bias) = Consumer(layer);
        return (input + F.linear(activations, w, bias)).MoveToOuterDisposeScope();
    }

    /// <summary>The block on new tokens only: the cached attention, then the same residuals and MLP as <see cref="PrunableBlock.Forward"/>.</summary>
    public Tensor Step(Tensor hidden, KvCache cache, int position)
    {
        using var scope = NewDisposeScope();
        var a = _attention.Heads(Optional, Norms.Rms(hidden, T("input_layernorm.weight"), _eps), cache, position);
        return AfterAttention(hidden, a).MoveToOuterDisposeScope();
    }

    /// <summary>The block on packed rows: rotary angles from each token's own position, attention as the caller's mask allows.</summary>
    public Tensor ForwardMasked(Tensor hidden, Tensor positions, Tensor attend)
    {
        using var scope = NewDisposeScope();
        var a = _attention.Heads(Optional, Norms.Rms(hidden, T("input_layernorm.weight"), _eps), positions: positions, attend: attend);
        return AfterAttention(hidden, a).MoveToOuterDisposeScope();
    }

    public override bool CanAddConsumerBias(int layer, out string reason)
    {
        var why = Qwen3Config.NoConsumerBias(layer);
        reason = why ?? "";
        return why is null;
    }

    /// <summary>`attention_bias` puts a bias on q, k and v as well as o_proj: the producers get zero ones.</summary>
    protected override void OnConsumerBiasAdded(int layer)
    {
        foreach (var linear in Qwen3Attention.Producers) AddZeroBias(_p + linear + ".weight", _p + linear + ".bias");
    }
}
