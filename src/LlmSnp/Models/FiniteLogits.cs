using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>
/// The one check of a model's output before anything is made of it (a perplexity, an accuracy, a sampled token):
/// NaN or infinite weights, or a config that breaks the forward, give non-finite logits, and argmax or softmax of
/// those is garbage printed with exit 0.
/// </summary>
public static class FiniteLogits
{
    public static LlmSnpException Error(string modelDir) =>
        new($"{modelDir}: the model produced non-finite logits (NaN or infinite weights, or a config that breaks the forward)");

    public static void Require(Tensor logits, string modelDir)
    {
        using var finite = torch.isfinite(logits).all();
        if (!finite.item<bool>()) throw Error(modelDir);
    }
}
