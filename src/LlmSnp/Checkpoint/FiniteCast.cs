using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

/// <summary>
/// The one check before a tensor is written in another dtype (convert, export gguf): the source holds no NaN or
/// infinity, and no value overflows the target (F16 tops out at ±65504: a float32 weight of 1e5 would become +inf).
/// </summary>
public static class FiniteCast
{
    /// <summary>
    /// <paramref name="t"/> in <paramref name="dtype"/>; throws naming <paramref name="where"/> and the tensor, with
    /// <paramref name="remedy"/> (what the user can write instead) when a value does not fit.
    /// </summary>
    public static Tensor To(Tensor t, ScalarType dtype, string where, string name, string remedy)
    {
        if (!Subspace.AllFinite(t)) throw new LlmSnpException($"{where}: tensor '{name}' holds NaN or infinite values");
        var c = t.to(dtype);
        if (c.dtype != t.dtype && !Subspace.AllFinite(c))
        {
            c.Dispose();
            throw new LlmSnpException($"{where}: tensor '{name}' has values beyond {SafeDTypes.ConfigName(dtype)}'s range (±{Max(dtype):G6}); {remedy}");
        }
        return c;
    }

    static double Max(ScalarType t) => t switch
    {
        ScalarType.Float16 => 65504, ScalarType.BFloat16 => 3.3895313892515355e38, ScalarType.Float32 => float.MaxValue, _ => double.MaxValue,
    };
}
