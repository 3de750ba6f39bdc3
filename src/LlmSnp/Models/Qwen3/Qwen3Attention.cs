using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>
/// Qwen3's self-attention (HF `Qwen3Attention`), shared by every block built on it: q/k/v projections, an RMSNorm of
/// every query and key head over head_dim (`q_norm`, `k_norm`: one weight of head_dim entries, shared by all heads)
/// before RoPE, grouped K/V heads, scale 1/√head_dim, an optional sliding window. The pruning unit is a K/V group (its
/// query heads, the K/V head they read, their o_proj columns); the norms act within a head, so removing heads leaves
/// them unchanged.
/// </summary>
public sealed class Qwen3Attention
{
    /// <summary>The attention's tensors under its layer's prefix, with shapes for the layer's widths.</summary>
    public static IEnumerable<(string Name, long[] Shape)> Tensors(int hidden, int heads, int kvHeads, int headDim, bool bias)
    {
        long h = hidden, q = (long)heads * headDim, kv = (long)kvHeads * headDim;
        foreach (var (name, rows, cols) in new[] { ("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, q) })
        {
            yield return (name + ".weight", new[] { rows, cols });
            if (bias) yield return (name + ".bias", new[] { rows });
        }
        yield return ("self_attn.q_norm.weight", new long[] { headDim });
        yield return ("self_attn.k_norm.weight", new long[] { headDim });
    }

    /// <summary>The K/V-group node layer: q rows of the group's heads, k/v rows of its K/V head, o_proj columns.</summary>
    public static UnitMap Units(string prefix, int index, int queriesPerKv, int headDim) =>
        new($"layers.{index}.self_attn", NodeKind.Heads, queriesPerKv * headDim,
            new[] { Projection(prefix, "q_proj"), Projection(prefix, "k_proj"), Projection(prefix, "v_proj") },
            prefix + "self_attn.o_proj.weight", prefix + "self_attn.o_proj.bias");

    /// <summary>The projections whose biases `attention_bias` turns on besides o_proj's.</summary>
    public static readonly string[] Producers = { "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj" };

    static Producer Projection(string prefix, string name) => new(prefix + "self_attn." + name + ".weight", prefix + "self_attn." + name + ".bias");

    readonly string _p;
    readonly int _headDim;
    readonly double _eps;
    readonly Rope _rope;
    readonly int? _window;

    public Qwen3Attention(string prefix, int headDim, double eps, Rope rope, int? window)
    {
        _p = prefix; _headDim = headDim; _eps = eps; _rope = rope; _window = window;
    }

    /// <summary>
    /// The heads' outputs concatenated [batch, tokens, heads·head_dim] (the input of o_proj) for the normed hidden states
    /// x of the tokens at positions <paramref name="position"/>..; with a cache their keys and values are appended first.
    /// </summary>
    public Tensor Heads(Func<string, Tensor?> tensor, Tensor x, KvCache? cache = null, int position = 0, Tensor? positions = null, Tensor? attend = null)
    {
        Tensor? T(string name) => tensor(_p + "self_attn." + name);
        // q_norm / k_norm normalise each head over head_dim, before the rotation.
        var w = new RotaryAttentionWeights(T("q_proj.weight")!, T("q_proj.bias"), T("k_proj.weight")!, T("k_proj.bias"), T("v_proj.weight")!, T("v_proj.bias"),
            T("q_norm.weight")!, T("k_norm.weight")!);
        return RotaryAttention.Forward(x, w, _headDim, _rope, _window, _eps, cache, position, positions, attend);
    }
}
