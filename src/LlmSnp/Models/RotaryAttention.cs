using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// The weights of one grouped-query rotary attention (HF `LlamaAttention`, `MistralAttention`, `Qwen3Attention`):
/// q/k/v projections (biases optional), and optionally per-head RMSNorms of q and k over head_dim applied after the
/// projection and before RoPE (Qwen3's `q_norm` / `k_norm`).
/// </summary>
public sealed record RotaryAttentionWeights(Tensor Q, Tensor? QBias, Tensor K, Tensor? KBias, Tensor V, Tensor? VBias, Tensor? QNorm = null, Tensor? KNorm = null);

/// <summary>
/// Grouped-query rotary attention as the LLaMA family computes it, with Qwen3's per-head q/k norms where given:
/// the input of the output projection, per-head softmax(QKᵀ/√d)V concatenated [batch, tokens, heads·d]. Query head h
/// reads K/V head h ÷ (heads / kv_heads). With a cache, x holds the tokens at positions <c>position</c>..: they are
/// rotated at those positions, their K/V (before the grouped repeat) appended, and the queries attend to the whole
/// cached history (causal from their own positions, the sliding window counted back from each). On packed rows
/// (<see cref="ICachedBlock.ForwardMasked"/>) each token rotates at its own position and attends as the caller's mask allows.
/// </summary>
public static class RotaryAttention
{
    public static Tensor Forward(Tensor x, RotaryAttentionWeights w, int headDim, Rope rope, int? slidingWindow, double normEps,
        KvCache? cache = null, int position = 0, Tensor? positions = null, Tensor? attend = null)
    {
        long b = x.shape[0], t = x.shape[1];
        Tensor Heads(Tensor weight, Tensor? bias, Tensor? norm)
        {
            var h = F.linear(x, weight, bias).view(b, t, -1, headDim);
            if (norm is not null) h = Norms.Rms(h, norm, normEps);
            return h.transpose(1, 2);
        }
        Tensor qh = Heads(w.Q, w.QBias, w.QNorm), kh = Heads(w.K, w.KBias, w.KNorm);
        var (q, k) = positions is null ? rope.Apply(qh, kh, position) : rope.ApplyAt(qh, kh, positions);
        var v = Heads(w.V, w.VBias, null);
        if (cache is not null) (k, v) = cache.Append(k, v);
        return Attention.Grouped(q, k, v, position, slidingWindow, packed: attend is null ? null : Attention.PackedMask(attend, positions!, slidingWindow));
    }
}
