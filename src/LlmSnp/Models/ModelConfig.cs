using System.Text.Json;
using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>Reads config.json strictly: every error names the file and the field.</summary>
public sealed class ConfigFile
{
    public string Path { get; }
    public JsonObject Json { get; }

    ConfigFile(string path, JsonObject json) { Path = path; Json = json; }

    public static ConfigFile Load(string modelDir)
    {
        if (!Directory.Exists(modelDir)) throw new LlmSnpException($"{modelDir}: model directory not found");
        string path = System.IO.Path.Combine(modelDir, "config.json");
        if (!File.Exists(path)) throw new LlmSnpException($"{path}: file not found");
        JsonNode? node;
        byte[] bytes = File.ReadAllBytes(path);
        if (!System.Text.Unicode.Utf8.IsValid(bytes)) throw new LlmSnpException($"{path}: not valid UTF-8");
        try
        {
            // Duplicate keys are ambiguous (which one would a loader honour?): reject them.
            node = JsonNode.Parse(bytes, documentOptions: new JsonDocumentOptions { MaxDepth = 32, AllowDuplicateProperties = false });
        }
        catch (JsonException e)
        {
            throw new LlmSnpException($"{path}: not valid JSON ({e.Message.Split('\n')[0]})");
        }
        if (node is not JsonObject obj) throw new LlmSnpException($"{path}: not a JSON object");
        return new ConfigFile(path, obj);
    }

    public string ModelType => String("model_type");

    public bool Has(string field) => Json.ContainsKey(field) && Json[field] != null;

    public string String(string field)
    {
        if (Json[field] is JsonValue v && v.TryGetValue<string>(out var s)) return s;
        throw Missing(field, "a string");
    }

    public int Int(string field, int? fallback = null, int min = 1)
    {
        var n = Json[field];
        if (n == null)
        {
            if (fallback is int f) return f;
            throw Missing(field, "an integer");
        }
        if (n is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out int i))
        {
            if (i < min) throw new LlmSnpException($"{Path}: field '{field}' is {i}, below {min}");
            return i;
        }
        throw Missing(field, "an integer");
    }

    public double Double(string field, double fallback)
    {
        var n = Json[field];
        if (n == null) return fallback;
        if (n is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind == JsonValueKind.Number) return e.GetDouble();
        throw Missing(field, "a number");
    }

    /// <summary>A number that must be positive and finite (a RoPE base, a norm's epsilon): anything else makes every forward garbage.</summary>
    public double Positive(string field, double fallback)
    {
        double d = Double(field, fallback);
        return double.IsFinite(d) && d > 0 ? d : throw Unsupported(field, $"is {d}; it must be a positive number");
    }

    public bool Bool(string field, bool fallback)
    {
        var n = Json[field];
        if (n == null) return fallback;
        if (n is JsonValue v && v.TryGetValue<JsonElement>(out var e) && (e.ValueKind is JsonValueKind.True or JsonValueKind.False)) return e.GetBoolean();
        throw Missing(field, "true or false");
    }

    /// <summary>An optional per-layer list of positive integers (a pruned checkpoint's widths).</summary>
    public int[]? IntList(string field, int layers)
    {
        var n = Json[field];
        if (n == null) return null;
        if (n is not JsonArray a || a.Count != layers) throw new LlmSnpException($"{Path}: field '{field}' must be a list of {layers} integers");
        var r = new int[layers];
        for (int i = 0; i < layers; i++)
        {
            if (a[i] is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out int x) && x >= 1) r[i] = x;
            else if (a[i] is JsonValue z && z.TryGetValue<JsonElement>(out var ze) && ze.ValueKind == JsonValueKind.Number && ze.TryGetInt32(out int zero) && zero == 0)
                throw new LlmSnpException($"{Path}: field '{field}'[{i}] is 0: layer {i} would have no units (a removed layer leaves the config instead)");
            else throw new LlmSnpException($"{Path}: field '{field}'[{i}] is not a positive integer");
        }
        return r;
    }

    /// <summary>`layer_types` (transformers' per-layer attention kinds): per layer, true for "sliding_attention", false for "full_attention".</summary>
    public bool[] SlidingLayerTypes(int layers)
    {
        if (Json["layer_types"] is not JsonArray a || a.Count != layers)
            throw Unsupported("layer_types", $"must be a list of {layers} strings (\"full_attention\" or \"sliding_attention\")");
        return a.Select((n, i) => n is JsonValue v && v.TryGetValue<string>(out var s) && s is "full_attention" or "sliding_attention"
            ? s == "sliding_attention"
            : throw Unsupported("layer_types", $"[{i}] is not \"full_attention\" or \"sliding_attention\"")).ToArray();
    }

    /// <summary>More layers than any real model: refused before per-layer arrays are allocated.</summary>
    public const int MaxLayers = 100_000;

    public int Layers()
    {
        int layers = Int("num_hidden_layers");
        if (layers > MaxLayers) throw Unsupported("num_hidden_layers", $"is {layers}; more than {MaxLayers} layers is not supported");
        return layers;
    }

    public LlmSnpException Missing(string field, string what) =>
        new($"{Path}: field '{field}' is missing or not {what}");

    public LlmSnpException Unsupported(string field, string why) =>
        new($"{Path}: field '{field}' {why}");
}
