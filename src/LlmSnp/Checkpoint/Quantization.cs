using System.Text.Json;
using System.Text.Json.Nodes;

namespace LlmSnp.Checkpoint;

/// <summary>
/// Refuses quantized checkpoints where they are opened. LlmSnp prunes full-precision weights: a GPTQ/AWQ
/// `qweight`, a bitsandbytes int8 code or an FP8 value read as a float is a different model (perplexity in
/// the tens of thousands), and its scales are tensors no family reads. A checkpoint says it is quantized in
/// config.json's `quantization_config` (transformers' quantizers) or `compression_config` (older
/// compressed-tensors); a bitsandbytes model saved without it still carries its scales (`*.SCB`, `*.absmax`).
/// </summary>
public static class Quantization
{
    const string Advice = "LlmSnp prunes full-precision weights: use the unquantized checkpoint";

    /// <summary>Tensor-name suffixes that only quantized checkpoints store, with the scheme they belong to.</summary>
    static readonly (string Suffix, string Scheme)[] Markers =
    {
        (".SCB", "bitsandbytes int8"), (".weight_format", "bitsandbytes int8"),
        (".absmax", "bitsandbytes 4-bit"), (".quant_map", "bitsandbytes 4-bit"), (".nested_absmax", "bitsandbytes 4-bit"),
        (".quant_state.bitsandbytes__nf4", "bitsandbytes 4-bit (nf4)"), (".quant_state.bitsandbytes__fp4", "bitsandbytes 4-bit (fp4)"),
        (".qweight", "GPTQ/AWQ"), (".qzeros", "GPTQ/AWQ"), (".g_idx", "GPTQ"),
        (".weight_scale_inv", "FP8 (block-wise)"), (".weight_scale", "FP8 or compressed-tensors"), (".input_scale", "FP8"),
        (".weight_packed", "compressed-tensors (packed)"), (".weight_zero_point", "compressed-tensors"),
    };

    /// <summary>Refuses a directory whose config.json declares a quantization (an unreadable config is left to the config loader).</summary>
    public static void RefuseConfig(string modelDir)
    {
        string path = Path.Combine(modelDir, "config.json");
        JsonNode? node;
        try
        {
            if (!File.Exists(path)) return;
            node = JsonNode.Parse(File.ReadAllBytes(path), documentOptions: new JsonDocumentOptions { MaxDepth = 32 });
        }
        catch (Exception e) when (e is JsonException or IOException or UnauthorizedAccessException or InvalidOperationException or ArgumentException) { return; }
        if (node is JsonObject o) Refuse(path, o);
    }

    /// <summary>Refuses a parsed config.json that declares a quantization, naming it.</summary>
    public static void Refuse(string configPath, JsonObject config)
    {
        foreach (var (owner, cfg) in new[] { ("", config), ("text_config.", config["text_config"] as JsonObject) })
        {
            if (cfg is null) continue;
            foreach (var field in new[] { "quantization_config", "compression_config" })
                if (cfg.TryGetPropertyValue(field, out var q) && q is not null)
                    throw new LlmSnpException($"{configPath}: field '{owner}{field}' says the checkpoint is quantized ({Describe(q)}); {Advice}");
        }
    }

    /// <summary>What a quantization_config names: its method and the detail that tells schemes apart.</summary>
    public static string Describe(JsonNode q)
    {
        if (q is not JsonObject o) return "quantization_config present";
        string? S(string k) => o[k] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
        bool B(string k) => o[k] is JsonValue v && v.TryGetValue<bool>(out var b) && b;
        string? N(string k) => o[k] is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind == JsonValueKind.Number ? e.GetRawText() : null;
        string? method = S("quant_method");
        if (method is null && (B("load_in_8bit") || B("load_in_4bit"))) method = "bitsandbytes";
        string name = method?.ToLowerInvariant() switch
        {
            "gptq" => "GPTQ", "awq" => "AWQ", "fp8" => "FP8", "fbgemm_fp8" => "FBGEMM FP8", "compressed-tensors" or "compressed_tensors" => "compressed-tensors",
            "bitsandbytes" => "bitsandbytes", "hqq" => "HQQ", "eetq" => "EETQ", "quanto" => "quanto", "aqlm" => "AQLM", "torchao" => "torchao", "bitnet" => "BitNet",
            null => "quantization_config without quant_method", _ => method,
        };
        var detail = new List<string>();
        if (name == "bitsandbytes")
        {
            if (B("load_in_8bit")) detail.Add("int8");
            if (B("load_in_4bit")) detail.Add("4-bit" + (S("bnb_4bit_quant_type") is string t ? " " + t : ""));
        }
        if (N("bits") is string bits) detail.Add(bits + " bits");
        if (S("format") is string fmt) detail.Add("format " + fmt);
        if (S("version") is string ver) detail.Add("version " + ver);
        return detail.Count == 0 ? name : $"{name}, {string.Join(", ", detail)}";
    }

    /// <summary>Refuses a checkpoint storing quantization tensors, whatever its config says.</summary>
    public static void RefuseTensors(string modelDir, IEnumerable<string> names)
    {
        foreach (var name in names)
            foreach (var (suffix, scheme) in Markers)
                if (name.EndsWith(suffix, StringComparison.Ordinal))
                    throw new LlmSnpException($"{modelDir}: tensor '{name}' belongs to a {scheme} quantized checkpoint; {Advice}");
    }
}
