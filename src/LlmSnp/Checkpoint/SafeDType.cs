using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

public enum SafeDType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL }

public static class SafeDTypes
{
    public static SafeDType Parse(string s, string where) => s switch
    {
        "F64" => SafeDType.F64, "F32" => SafeDType.F32, "F16" => SafeDType.F16, "BF16" => SafeDType.BF16,
        "I64" => SafeDType.I64, "I32" => SafeDType.I32, "I16" => SafeDType.I16, "I8" => SafeDType.I8,
        "U8" => SafeDType.U8, "BOOL" => SafeDType.BOOL,
        "F8_E4M3" or "F8_E5M2" => throw new LlmSnpException($"{where}: dtype {s} (8-bit float: an FP8-quantized checkpoint) is not supported; LlmSnp prunes full-precision weights"),
        _ => throw new LlmSnpException($"{where}: unknown dtype '{s}'"),
    };

    public static int Size(SafeDType d) => d switch
    {
        SafeDType.F64 or SafeDType.I64 => 8,
        SafeDType.F32 or SafeDType.I32 => 4,
        SafeDType.F16 or SafeDType.BF16 or SafeDType.I16 => 2,
        _ => 1,
    };

    public static ScalarType ToTorch(SafeDType d) => d switch
    {
        SafeDType.F64 => ScalarType.Float64, SafeDType.F32 => ScalarType.Float32, SafeDType.F16 => ScalarType.Float16,
        SafeDType.BF16 => ScalarType.BFloat16, SafeDType.I64 => ScalarType.Int64, SafeDType.I32 => ScalarType.Int32,
        SafeDType.I16 => ScalarType.Int16, SafeDType.I8 => ScalarType.Int8, SafeDType.U8 => ScalarType.Byte,
        _ => ScalarType.Bool,
    };

    public static SafeDType FromTorch(ScalarType t) => t switch
    {
        ScalarType.Float64 => SafeDType.F64, ScalarType.Float32 => SafeDType.F32, ScalarType.Float16 => SafeDType.F16,
        ScalarType.BFloat16 => SafeDType.BF16, ScalarType.Int64 => SafeDType.I64, ScalarType.Int32 => SafeDType.I32,
        ScalarType.Int16 => SafeDType.I16, ScalarType.Int8 => SafeDType.I8, ScalarType.Byte => SafeDType.U8,
        ScalarType.Bool => SafeDType.BOOL,
        _ => throw new LlmSnpException($"dtype {t} cannot be stored in safetensors"),
    };

    /// <summary>HF config.json's torch_dtype names.</summary>
    public static string ConfigName(ScalarType t) => t switch
    {
        ScalarType.Float64 => "float64", ScalarType.Float32 => "float32", ScalarType.Float16 => "float16",
        ScalarType.BFloat16 => "bfloat16",
        _ => throw new LlmSnpException($"dtype {t} is not a floating-point weight dtype"),
    };

    /// <summary>Parses a dtype option's value (float32, f16, bf16, ...); errors name <paramref name="option"/>.</summary>
    public static ScalarType ParseOption(string s, string option = "--dtype") => s.ToLowerInvariant() switch
    {
        "float64" or "f64" or "double" => ScalarType.Float64,
        "float32" or "f32" or "float" => ScalarType.Float32,
        "float16" or "f16" or "half" => ScalarType.Float16,
        "bfloat16" or "bf16" => ScalarType.BFloat16,
        _ => throw new LlmSnpException($"{option}: unknown dtype '{s}' (float64, float32, float16, bfloat16)"),
    };
}
