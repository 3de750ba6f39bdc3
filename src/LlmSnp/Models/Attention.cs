using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>Attention pieces the families share.</summary>
public static class Attention
{
    /// <summary>
    /// Multi-head attention outputs softmax(QKᵀ/√d)V of every head, concatenated [batch, tokens, heads·d]:
    /// the input of the output projection (OPT, ViT). SDPA's default scale 1/√d on the scores equals
    /// scaling q after its bias (HF OPT) or the scores (ViT).
    /// </summary>
    /// <param name="cache">
    /// Generation (causal only): x holds positions <paramref name="position"/>.. of the sequence; its keys and
    /// values are appended to the cache and the queries attend to the whole history. Without a cache x is the
    /// whole sequence from position 0.
    /// </param>
    /// <param name="attend">Packed rows (<see cref="ICachedBlock.ForwardMasked"/>): the caller's mask [batch, t, t], true = attend; replaces <paramref name="causal"/>.</param>
    public static Tensor MultiHead(Tensor x, Tensor qw, Tensor qb, Tensor kw, Tensor kb, Tensor vw, Tensor vb, int headDim, bool causal,
        KvCache? cache = null, int position = 0, Tensor? attend = null)
    {
        long b = x.shape[0], t = x.shape[1];
        Tensor Split(Tensor w, Tensor bias) => F.linear(x, w, bias).view(b, t, -1, headDim).transpose(1, 2);
        Tensor q = Split(qw, qb), k = Split(kw, kb), v = Split(vw, vb);
        Tensor? mask = null;
        if (attend is not null) { mask = attend.unsqueeze(1); causal = false; }   // one mask for every head
        else if (cache is not null)
        {
            (k, v) = cache.Append(k, v);
            // From position 0 the cache holds exactly x's keys: the plain causal path. Later, queries sit at the bottom right.
            if (position > 0) { mask = CachedMask(position, t, null, x.device); causal = false; }
        }
        var o = F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal);
        return o.transpose(1, 2).reshape(b, t, -1);
    }

    /// <summary>
    /// Which cached keys the queries at positions start..start+t-1 attend to ([t, start+t], true = attend): those at or
    /// before their own position and, with a sliding window, fewer than <paramref name="window"/> positions back.
    /// Null where every query sees every key (one new token inside the window): SDPA then needs no mask.
    /// SDPA's is_causal aligns the triangle top-left, wrong once queries start past 0, hence an explicit mask.
    /// </summary>
    public static Tensor? CachedMask(long start, long t, int? window, Device device)
    {
        long keys = start + t;
        if (t == 1 && (window is not int w0 || keys <= w0)) return null;
        var i = torch.arange(start, keys, device: device).unsqueeze(1);
        var j = torch.arange(keys, device: device).unsqueeze(0);
        var m = j <= i;
        return window is int w ? m.logical_and(i - j < w) : m;
    }

    /// <summary>
    /// A packed-row mask [batch, t, t] (<see cref="ICachedBlock.ForwardMasked"/>) narrowed to keys fewer than
    /// <paramref name="window"/> positions before each query, and with one head axis for SDPA: [batch, 1, t, t].
    /// </summary>
    public static Tensor PackedMask(Tensor attend, Tensor positions, int? window)
    {
        if (window is not int w) return attend.unsqueeze(1);
        var back = positions.unsqueeze(2) - positions.unsqueeze(1);   // query position − key position
        return attend.logical_and(back < w).unsqueeze(1);
    }

    /// <summary>Causal attention limited to the last <paramref name="window"/> positions (true = attend).</summary>
    public static Tensor SlidingWindowMask(long t, int window, Device device)
    {
        var i = torch.arange(t, device: device).unsqueeze(1);
        var j = torch.arange(t, device: device).unsqueeze(0);
        return (j <= i).logical_and(i - j < window);
    }
}
