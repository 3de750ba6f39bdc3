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
}
