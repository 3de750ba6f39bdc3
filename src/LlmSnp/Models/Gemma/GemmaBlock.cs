using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// One Gemma 2 / Gemma 3 decoder layer (HF `Gemma2DecoderLayer`, `Gemma3DecoderLayer`), four (1 + w) RMSNorms around two
/// sub-blocks:
///   x += post_attention_layernorm(o_proj(attention(input_layernorm(x))))
///   x += post_feedforward_layernorm(down(gelu_tanh(gate(h)) · up(h))),  h = pre_feedforward_layernorm(x)
/// Attention: grouped K/V heads, (Gemma 3) q_norm / k_norm over head_dim before RoPE, scores scaled by
/// query_pre_attn_scalar^−½, (Gemma 2) soft-capped, a sliding window on local layers. Node layers: the K/V groups and
/// the MLP neurons; their consumers (o_proj, down_proj) act before the post-norms, so a reconstruction fits the
/// sub-block's output before its norm.
/// </summary>
public sealed class GemmaBlock : PrunableBlock, ICachedBlock
{
    readonly string _p;
    readonly GemmaConfig _c;
    readonly int? _window;
    readonly Rope _rope;

    public GemmaBlock(string prefix, int index, GemmaConfig c, Rope rope, Dictionary<string, Tensor> tensors)
        : base(tensors, new[]
        {
            new UnitMap($"layers.{index}.self_attn", NodeKind.Heads, c.QueriesPerKv * c.HeadDim,
                Projections.Select(n => new Producer(prefix + n + ".weight", prefix + n + ".bias")).ToArray(),
                prefix + "self_attn.o_proj.weight", prefix + "self_attn.o_proj.bias"),
            new UnitMap($"layers.{index}.mlp", NodeKind.Mlp, 1,
                new[] { new Producer(prefix + "mlp.gate_proj.weight", null), new Producer(prefix + "mlp.up_proj.weight", null) },
                prefix + "mlp.down_proj.weight", prefix + "mlp.down_proj.bias"),
        })
    {
        _p = prefix; _c = c; _rope = rope; _window = c.Window(index);
    }

    /// <summary>The projections that `attention_bias` gives a bias besides o_proj.</summary>
    static readonly string[] Projections = { "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj" };

    /// <summary>The layer's tensors (names under its prefix) and shapes for layer <paramref name="i"/>'s widths.</summary>
    public static IEnumerable<(string Name, long[] Shape)> Tensors(GemmaConfig c, int i)
    {
        long h = c.Hidden, q = (long)c.Widths.Heads[i] * c.HeadDim, kv = (long)c.Widths.KvHeads[i] * c.HeadDim, f = c.Widths.Intermediate[i];
        foreach (var (name, rows, cols) in new[] { ("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, q) })
        {
            yield return (name + ".weight", new[] { rows, cols });
            if (c.AttentionBias) yield return (name + ".bias", new[] { rows });
        }
        if (c.Gemma3)
        {
            yield return ("self_attn.q_norm.weight", new long[] { c.HeadDim });
            yield return ("self_attn.k_norm.weight", new long[] { c.HeadDim });
        }
        yield return ("mlp.gate_proj.weight", new[] { f, h });
        yield return ("mlp.up_proj.weight", new[] { f, h });
        yield return ("mlp.down_proj.weight", new[] { h, f });
        foreach (var norm in new[] { "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm" })
            yield return (norm + ".weight", new[] { h });
    }

    Tensor T(string name) => W[_p + name];

    Tensor Norm(Tensor x, string name) => Norms.GemmaRms(x, T(name + ".weight"), _c.RmsNormEps);

    Tensor Linear(Tensor x, string name) => F.linear(x, T(name + ".weight"), Optional(_p + name + ".bias"));

    /// <summary>The heads' outputs concatenated (the input of o_proj) for the normed x at positions <paramref name="position"/>..</summary>
    Tensor SelfAttention(Tensor x, KvCache? cache = null, int position = 0, Tensor? positions = null, Tensor? attend = null)
    {
        long b = x.shape[0], t = x.shape[1];
        Tensor Heads(string name) => Linear(x, name).view(b, t, -1, _c.HeadDim);
        Tensor q = Heads("self_attn.q_proj"), k = Heads("self_attn.k_proj"), v = Heads("self_attn.v_proj").transpose(1, 2);
        if (_c.Gemma3)
        {
            q = Norm(q, "self_attn.q_norm");
            k = Norm(k, "self_attn.k_norm");
        }
        (q, k) = positions is null ? _rope.Apply(q.transpose(1, 2), k.transpose(1, 2), position) : _rope.ApplyAt(q.transpose(1, 2), k.transpose(1, 2), positions, attend);
        if (cache is not null) (k, v) = cache.Append(k, v);
        return Attention.Grouped(q, k, v, position, _window, Math.Pow(_c.QueryPreAttnScalar, -0.5), _c.AttnSoftcap,
            attend is null ? null : Attention.PackedMask(attend, positions!, _window));
    }

    Tensor Gelu(Tensor x) => _c.Activation == "gelu" ? F.gelu(x) : F.gelu(x, approximate: TorchSharp.Modules.GELU.Approximate.tanh);

    public override Tensor Activations(int layer, Tensor input)
    {
        using var scope = NewDisposeScope();
        if (layer == 0) return SelfAttention(Norm(input, "input_layernorm")).MoveToOuterDisposeScope();
        var x = Norm(input, "pre_feedforward_layernorm");
        return Gelu(Linear(x, "mlp.gate_proj")).mul_(Linear(x, "mlp.up_proj")).MoveToOuterDisposeScope();
    }

    /// <summary>The consumer's output goes through the sub-block's post-norm before it joins the residual stream.</summary>
    public override Tensor Residual(int layer, Tensor input, Tensor activations)
    {
        using var scope = NewDisposeScope();
        var (w, bias) = Consumer(layer);
        var output = F.linear(activations, w, bias);
        return (input + Norm(output, layer == 0 ? "post_attention_layernorm" : "post_feedforward_layernorm")).MoveToOuterDisposeScope();
    }

    public Tensor Step(Tensor hidden, KvCache cache, int position)
    {
        using var scope = NewDisposeScope();
        var a = SelfAttention(Norm(hidden, "input_layernorm"), cache, position);
        return AfterAttention(hidden, a).MoveToOuterDisposeScope();
    }

    /// <summary>The block on packed rows: rotary angles from each token's own position, attention as the caller's mask allows.</summary>
    public Tensor ForwardMasked(Tensor hidden, Tensor positions, Tensor attend)
    {
        using var scope = NewDisposeScope();
        var a = SelfAttention(Norm(hidden, "input_layernorm"), positions: positions, attend: attend);
        return AfterAttention(hidden, a).MoveToOuterDisposeScope();
    }

    public override bool CanAddConsumerBias(int layer, out string reason)
    {
        var why = _c.NoConsumerBias(layer);
        reason = why ?? "";
        return why is null;
    }

    /// <summary>`attention_bias` puts a bias on q, k and v as well as o_proj: the producers get zero ones.</summary>
    protected override void OnConsumerBiasAdded(int layer)
    {
        foreach (var linear in Projections) AddZeroBias(_p + linear + ".weight", _p + linear + ".bias");
    }
}
