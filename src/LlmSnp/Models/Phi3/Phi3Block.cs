using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// One Phi-3 decoder layer (HF `Phi3DecoderLayer`): RMSNorm, attention from one fused `qkv_proj` (q rows, then k,
/// then v) with rotate-half RoPE on the first rotary dims of each head (partial rotary, longrope tables) and grouped
/// K/V heads, RMSNorm, SwiGLU from one fused `gate_up_proj` (gate rows, then up): `down(up · silu(gate))`.
/// Node layers as in LLaMA — the K/V groups (the input of `o_proj`) and the MLP neurons — with their producer rows
/// in segments of the fused tensors, which stay fused through pruning.
/// </summary>
public sealed class Phi3Block : PrunableBlock, ICachedBlock
{
    readonly string _p;
    readonly int _headDim;
    readonly double _eps;
    readonly Rope _rope;
    readonly int? _window;

    string Qkv => _p + "self_attn.qkv_proj.weight";
    string GateUp => _p + "mlp.gate_up_proj.weight";

    /// <param name="qkvRows">Rows of qkv_proj's q, k and v segments; <paramref name="gateUpRows"/> those of gate_up_proj's gate and up.</param>
    public Phi3Block(string prefix, int index, int headDim, int queriesPerKv, double eps, Rope rope, int? slidingWindow,
        long[] qkvRows, long[] gateUpRows, Dictionary<string, Tensor> tensors)
        : base(tensors, new[]
        {
            new UnitMap($"layers.{index}.self_attn", NodeKind.Heads, queriesPerKv * headDim,
                new[] { new Producer(prefix + "self_attn.qkv_proj.weight", null, 0), new Producer(prefix + "self_attn.qkv_proj.weight", null, 1),
                        new Producer(prefix + "self_attn.qkv_proj.weight", null, 2) },
                prefix + "self_attn.o_proj.weight", prefix + "self_attn.o_proj.bias"),
            new UnitMap($"layers.{index}.mlp", NodeKind.Mlp, 1,
                new[] { new Producer(prefix + "mlp.gate_up_proj.weight", null, 0), new Producer(prefix + "mlp.gate_up_proj.weight", null, 1) },
                prefix + "mlp.down_proj.weight", prefix + "mlp.down_proj.bias"),
        }, new Dictionary<string, long[]> { [prefix + "self_attn.qkv_proj.weight"] = qkvRows, [prefix + "mlp.gate_up_proj.weight"] = gateUpRows })
    {
        _p = prefix; _headDim = headDim; _eps = eps; _rope = rope; _window = slidingWindow;
    }

    /// <summary>Stock Phi3 builds qkv_proj, o_proj, gate_up_proj and down_proj with bias=False whatever the config says.</summary>
    public override bool CanAddConsumerBias(int layer, out string reason)
    {
        reason = layer == 0 ? "stock phi3 o_proj has no bias" : "stock phi3 down_proj has no bias";
        return false;
    }

    Tensor T(string name) => W[_p + name];

    public override Tensor Activations(int layer, Tensor input)
    {
        using var scope = NewDisposeScope();
        if (layer == 0) return SelfAttention(Norms.Rms(input, T("input_layernorm.weight"), _eps)).MoveToOuterDisposeScope();
        var x = Norms.Rms(input, T("post_attention_layernorm.weight"), _eps);
        var gu = F.linear(x, W[GateUp]);
        var rows = SegmentRows(GateUp);
        // HF: gate, up = gate_up_proj(x).chunk(2); up · silu(gate). The slices are copied so silu can work in place.
        return F.silu(gu.narrow(-1, 0, rows[0]).contiguous(), inplace: true).mul_(gu.narrow(-1, rows[0], rows[1])).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Per-head outputs softmax(QKᵀ/√d)V concatenated [batch, tokens, heads·d] (HF `Phi3Attention`: q, k, v are the
    /// qkv_proj output's first heads·d, next kv·d and last kv·d columns). With a cache, x holds the tokens at positions
    /// <paramref name="position"/>..; on packed rows each token rotates at its own position and attends as the mask allows.
    /// </summary>
    Tensor SelfAttention(Tensor x, KvCache? cache = null, int position = 0, Tensor? positions = null, Tensor? attend = null)
    {
        long b = x.shape[0], t = x.shape[1];
        var qkv = F.linear(x, W[Qkv]);
        var rows = SegmentRows(Qkv);
        Tensor Heads(long from, long count) => qkv.narrow(-1, from, count).view(b, t, -1, _headDim).transpose(1, 2);
        Tensor qh = Heads(0, rows[0]), kh = Heads(rows[0], rows[1]);
        var (q, k) = positions is null ? _rope.Apply(qh, kh, position) : _rope.ApplyAt(qh, kh, positions, attend);
        var v = Heads(rows[0] + rows[1], rows[2]);
        if (cache is not null) (k, v) = cache.Append(k, v);
        // Phi3Model masks keys W or more positions back whenever sliding_window is set.
        return Attention.Grouped(q, k, v, position, _window, packed: attend is null ? null : Attention.PackedMask(attend, positions!, _window));
    }

    /// <summary>The block on new tokens only: the cached attention, then the same residuals and MLP as <see cref="PrunableBlock.Forward"/>.</summary>
    public Tensor Step(Tensor hidden, KvCache cache, int position)
    {
        using var scope = NewDisposeScope();
        var a = SelfAttention(Norms.Rms(hidden, T("input_layernorm.weight"), _eps), cache, position);
        return AfterAttention(hidden, a).MoveToOuterDisposeScope();
    }

    /// <summary>The block on packed rows: rotary angles from each token's own position, attention as the caller's mask allows.</summary>
    public Tensor ForwardMasked(Tensor hidden, Tensor positions, Tensor attend)
    {
        using var scope = NewDisposeScope();
        var a = SelfAttention(Norms.Rms(hidden, T("input_layernorm.weight"), _eps), positions: positions, attend: attend);
        return AfterAttention(hidden, a).MoveToOuterDisposeScope();
    }

    public override Tensor Residual(int layer, Tensor input, Tensor activations)
    {
        using var scope = NewDisposeScope();
        var (w, bias) = Consumer(layer);
        return (input + F.linear(activations, w, bias)).MoveToOuterDisposeScope();
    }
}
