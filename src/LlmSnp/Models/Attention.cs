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
    /// Grouped-query attention of heads already rotated (HF `repeat_kv` + the attention function): q [b, heads, t, d] for
    /// the positions <paramref name="position"/>..position+t-1, k and v [b, kv_heads, position+t, d] holding every key up to
    /// the last query (the whole sequence from position 0, or a KV cache's history). Query head h reads K/V head
    /// h ÷ (heads / kv_heads); each query sees the keys at or before its own position and, with a
    /// <paramref name="window"/> W, only the last W of them (itself included). Scores are q·kᵀ·<paramref name="scale"/>
    /// (default 1/√d) and, with a <paramref name="softcap"/> c, c·tanh(score / c) before the mask (Gemma 2), softmaxed in
    /// float32 at least, as HF's eager attention. Returns the heads' outputs concatenated, [b, t, heads·d].
    /// </summary>
    public static Tensor Grouped(Tensor q, Tensor k, Tensor v, int position, int? window, double? scale = null, double? softcap = null, Tensor? packed = null)
    {
        long b = q.shape[0], t = q.shape[2];
        long repeat = q.shape[1] / k.shape[1];
        if (repeat > 1)
        {
            k = k.repeat_interleave(repeat, 1);
            v = v.repeat_interleave(repeat, 1);
        }
        // From position 0 the plain causal triangle (a window only when the sequence is longer); later, queries sit at
        // the bottom right of the cached keys.
        // Packed rows bring their own mask ([b, 1, t, t], the window applied: PackedMask).
        Tensor? mask = packed ?? (position == 0
            ? (window is int w && w < t ? SlidingWindowMask(t, w, q.device) : null)
            : CachedMask(position, t, window, q.device));
        bool causal = packed is null && position == 0 && mask is null;
        Tensor o;
        if (scale is null && softcap is null) o = F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal);
        else
        {
            var scores = torch.matmul(q, k.transpose(2, 3)).mul_(scale ?? 1.0 / Math.Sqrt(q.shape[3]));
            if (softcap is double c) scores = scores.div_(c).tanh_().mul_(c);
            var allowed = mask ?? (causal ? CachedMask(0, t, null, q.device) : null);
            if (allowed is not null) scores = scores.masked_fill(allowed.logical_not(), double.NegativeInfinity);
            var p = scores.dtype is ScalarType.Float16 or ScalarType.BFloat16
                ? F.softmax(scores.to(ScalarType.Float32), -1).to(scores.dtype)
                : F.softmax(scores, -1);
            o = torch.matmul(p, v);
        }
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
