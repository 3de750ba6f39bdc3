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
    public static Tensor MultiHead(Tensor x, Tensor qw, Tensor qb, Tensor kw, Tensor kb, Tensor vw, Tensor vb, int headDim, bool causal)
    {
        long b = x.shape[0], t = x.shape[1];
        Tensor Split(Tensor w, Tensor bias) => F.linear(x, w, bias).view(b, t, -1, headDim).transpose(1, 2);
        var o = F.scaled_dot_product_attention(Split(qw, qb), Split(kw, kb), Split(vw, vb), null, 0.0, causal);
        return o.transpose(1, 2).reshape(b, t, -1);
    }
}
