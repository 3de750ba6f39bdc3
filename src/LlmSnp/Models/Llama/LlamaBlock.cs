using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// One Llama / Mistral / Qwen2 decoder layer (HF `LlamaDecoderLayer`): RMSNorm, attention with
/// rotate-half RoPE and grouped K/V heads, RMSNorm, SwiGLU MLP `down(silu(gate(x)) · up(x))`.
/// Node layers: the K/V groups (the query heads that share a K/V head, with it: the input of `o_proj`)
/// and the MLP neurons (row j of gate and up, column j of down).
/// </summary>
public sealed class LlamaBlock : PrunableBlock, ICachedBlock
{
    readonly string _p;
    readonly int _headDim, _queriesPerKv;
    readonly double _eps;
    readonly Rope _rope;
    readonly int? _window;
    readonly Func<int, string?> _noConsumerBias;

    /// <param name="noConsumerBias">Per node layer: why the stock class cannot hold an added consumer bias, or null where it can.</param>
    public LlamaBlock(string prefix, int index, int headDim, int queriesPerKv, double eps, Rope rope, int? slidingWindow, Dictionary<string, Tensor> tensors,
        Func<int, string?>? noConsumerBias = null)
        : base(tensors, new[]
        {
            new UnitMap($"layers.{index}.self_attn", NodeKind.Heads, queriesPerKv * headDim,
                new[] { P(prefix, "self_attn.q_proj"), P(prefix, "self_attn.k_proj"), P(prefix, "self_attn.v_proj") },
                prefix + "self_attn.o_proj.weight", prefix + "self_attn.o_proj.bias"),
            new UnitMap($"layers.{index}.mlp", NodeKind.Mlp, 1, new[] { P(prefix, "mlp.gate_proj"), P(prefix, "mlp.up_proj") },
                prefix + "mlp.down_proj.weight", prefix + "mlp.down_proj.bias"),
        })
    {
        _p = prefix; _headDim = headDim; _queriesPerKv = queriesPerKv; _eps = eps; _rope = rope; _window = slidingWindow;
        _noConsumerBias = noConsumerBias ?? (_ => null);
    }

    public override bool CanAddConsumerBias(int layer, out string reason)
    {
        var why = _noConsumerBias(layer);
        reason = why ?? "";
        return why is null;
    }

    static Producer P(string prefix, string linear) => new(prefix + linear + ".weight", prefix + linear + ".bias");

    Tensor T(string name) => W[_p + name];

    Tensor Linear(Tensor x, string linear) => F.linear(x, T(linear + ".weight"), Optional(_p + linear + ".bias"));

    public override Tensor Activations(int layer, Tensor input)
    {
        using var scope = NewDisposeScope();
        if (layer == 0) return SelfAttention(Norms.Rms(input, T("input_layernorm.weight"), _eps)).MoveToOuterDisposeScope();
        var x = Norms.Rms(input, T("post_attention_layernorm.weight"), _eps);
        // In place on the fresh gate output: two [tokens, intermediate] temporaries fewer a block.
        return F.silu(Linear(x, "mlp.gate_proj"), inplace: true).mul_(Linear(x, "mlp.up_proj")).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Per-head outputs softmax(QKᵀ/√d)V concatenated [batch, tokens, heads·d]; query head h reads K/V head h ÷ (heads / kv_heads).
    /// With a cache, x holds the tokens at positions <paramref name="position"/>..: they are rotated at those positions, their
    /// K/V (before the grouped repeat) appended, and the queries attend to the whole cached history.
    /// </summary>
    /// <remarks>Packed rows (<see cref="ForwardMasked"/>): per-token <paramref name="positions"/> and the caller's mask <paramref name="attend"/>.</remarks>
    Tensor SelfAttention(Tensor x, KvCache? cache = null, int position = 0, Tensor? positions = null, Tensor? attend = null)
    {
        long b = x.shape[0], t = x.shape[1];
        Tensor Heads(string linear) => Linear(x, linear).view(b, t, -1, _headDim).transpose(1, 2);
        var (q, k) = positions is null ? _rope.Apply(Heads("self_attn.q_proj"), Heads("self_attn.k_proj"), position)
            : _rope.ApplyAt(Heads("self_attn.q_proj"), Heads("self_attn.k_proj"), positions, attend);
        var v = Heads("self_attn.v_proj");
        if (cache is not null) (k, v) = cache.Append(k, v);
        if (_queriesPerKv > 1)
        {
            k = k.repeat_interleave(_queriesPerKv, 1);
            v = v.repeat_interleave(_queriesPerKv, 1);
        }
        Tensor? mask;
        bool causal;
        if (attend is not null)
        {
            mask = Attention.PackedMask(attend, positions!, _window);
            causal = false;
        }
        else if (position == 0)
        {
            // Mistral's window applies only when the sequence is longer than it.
            mask = _window is int w && w < t ? Attention.SlidingWindowMask(t, w, x.device) : null;
            causal = mask is null;
        }
        else
        {
            // Continuing a cached sequence: causal from the queries' own positions, the window counted back from each.
            mask = Attention.CachedMask(position, t, _window, x.device);
            causal = false;
        }
        var o = F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal);
        return o.transpose(1, 2).reshape(b, t, -1);
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

    /// <summary>HF's `attention_bias` / `mlp_bias` flag a bias on every projection of the set: add the producers' as zeros.</summary>
    protected override void OnConsumerBiasAdded(int layer)
    {
        foreach (var linear in layer == 0 ? new[] { "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj" } : new[] { "mlp.gate_proj", "mlp.up_proj" })
            AddZeroBias(_p + linear + ".weight", _p + linear + ".bias");
    }
}
