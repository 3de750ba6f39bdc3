using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>The normalisations the families share, with HF's dtype handling.</summary>
public static class Norms
{
    /// <summary>RMSNorm as HF computes it: in float32 at least, cast back before the weight.</summary>
    public static Tensor Rms(Tensor x, Tensor weight, double eps)
    {
        var dtype = x.dtype;
        var xf = dtype is ScalarType.Float16 or ScalarType.BFloat16 ? x.to(ScalarType.Float32) : x;
        var normed = xf * torch.rsqrt(xf.pow(2).mean(new long[] { -1 }, keepdim: true) + eps);
        return weight * normed.to(dtype);
    }

    /// <summary>
    /// Gemma's RMSNorm (HF `Gemma2RMSNorm`, `Gemma3RMSNorm`): x·rsqrt(mean(x²)+eps)·(1 + w), computed in float32 at
    /// least and cast back after the weight ("(x·w).to(dtype)", not LLaMA's "x.to(dtype)·w"); a zero weight is the identity scale.
    /// </summary>
    public static Tensor GemmaRms(Tensor x, Tensor weight, double eps)
    {
        var dtype = x.dtype;
        var xf = dtype is ScalarType.Float16 or ScalarType.BFloat16 ? x.to(ScalarType.Float32) : x;
        var normed = xf * torch.rsqrt(xf.pow(2).mean(new long[] { -1 }, keepdim: true) + eps);
        return normed.mul_(weight.to(xf.dtype) + 1).to(dtype);
    }
}
