using System.Text.Json;
using System.Text.Json.Nodes;

namespace LlmSnp.Data;

/// <summary>Reads and checks a HF `tokenizer.json` before the tokenizers library is given it.</summary>
public static class TokenizerJson
{
    public static JsonObject Read(string path, long maxBytes)
    {
        byte[] bytes;
        try
        {
            using var fs = File.OpenRead(path);
            if (fs.Length > maxBytes) throw new LlmSnpException($"{path}: {fs.Length} bytes, larger than any tokenizer.json ({maxBytes} at most)");
            bytes = new byte[fs.Length];
            fs.ReadExactly(bytes);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new LlmSnpException($"{path}: cannot read ({e.Message})"); }
        if (!System.Text.Unicode.Utf8.IsValid(bytes)) throw new LlmSnpException($"{path}: not valid UTF-8");
        try
        {
            return JsonNode.Parse(bytes, documentOptions: new JsonDocumentOptions { MaxDepth = 64 }) as JsonObject
                ?? throw new LlmSnpException($"{path}: not a JSON object");
        }
        catch (JsonException e) { throw new LlmSnpException($"{path}: not valid JSON ({e.Message.Split('\n')[0]})"); }
    }

    static readonly string[] Strategies = { "LongestFirst", "OnlyFirst", "OnlySecond" }, Directions = { "Left", "Right" };

    /// <summary>
    /// The truncation and padding options, checked as the tokenizers library would need them: a stride not below
    /// max_length minus the special tokens the post-processor adds makes it panic (`assertion failed: stride &lt;
    /// max_len`) on the first long text; a pad_to_multiple_of of 0 divides by zero. transformers refuses such a
    /// file when it enables the options; so does LlmSnp, naming the field.
    /// </summary>
    public static void CheckOptions(string path, JsonObject json)
    {
        LlmSnpException Bad(string field, string why) => new($"{path}: field '{field}' {why}");
        if (json["truncation"] is JsonNode tn)
        {
            if (tn is not JsonObject t) throw Bad("truncation", "is not an object or null");
            long max = UInt(t, "max_length", null, Bad);
            long stride = UInt(t, "stride", 0, Bad);
            OneOf(t, "strategy", Strategies, Bad);
            OneOf(t, "direction", Directions, Bad);
            int specials = SpecialTokensAdded(json["post_processor"]);
            if (max < 1) throw Bad("truncation.max_length", "is 0: nothing would be left of a text");
            if (stride >= max - specials)
                throw Bad("truncation.stride", $"is {stride}, not below max_length {max} minus the {specials} special token(s) the post-processor adds; the tokenizers library would abort on the first long text");
        }
        if (json["padding"] is JsonNode pn)
        {
            if (pn is not JsonObject p) throw Bad("padding", "is not an object or null");
            switch (p["strategy"])
            {
                case null: break;
                case JsonValue v when v.TryGetValue<string>(out var s) && s == "BatchLongest": break;
                case JsonObject o when o.Count == 1 && o.ContainsKey("Fixed"): UInt(o, "Fixed", null, (f, w) => Bad("padding.strategy.Fixed", w)); break;
                default: throw Bad("padding.strategy", "is neither \"BatchLongest\" nor {\"Fixed\": n}");
            }
            OneOf(p, "direction", Directions, Bad);
            if (p["pad_to_multiple_of"] is not null && UInt(p, "pad_to_multiple_of", null, Bad) < 1) throw Bad("padding.pad_to_multiple_of", "is 0: a multiple of 0 divides by zero");
            UInt(p, "pad_id", 0, Bad);
            UInt(p, "pad_type_id", 0, Bad);
            if (p["pad_token"] is JsonNode tok && !(tok is JsonValue tv && tv.TryGetValue<string>(out _))) throw Bad("padding.pad_token", "is not a string");
        }
    }

    /// <summary>An unsigned integer field the library holds in 32 bits (lengths and ids), or its default.</summary>
    static long UInt(JsonObject o, string field, long? fallback, Func<string, string, LlmSnpException> bad)
    {
        string name = (o.Parent is JsonObject parent ? parent.First(kv => kv.Value == o).Key + "." : "") + field;
        var n = o[field];
        if (n is null) return fallback ?? throw bad(name, "is missing");
        if (n is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind == JsonValueKind.Number && e.TryGetInt64(out long x) && x >= 0 && x <= uint.MaxValue) return x;
        throw bad(name, $"is {n.ToJsonString()}, not an integer from 0 to {uint.MaxValue}");
    }

    static void OneOf(JsonObject o, string field, string[] allowed, Func<string, string, LlmSnpException> bad)
    {
        string name = (o.Parent is JsonObject parent ? parent.First(kv => kv.Value == o).Key + "." : "") + field;
        var n = o[field];
        if (n is null) return;
        if (n is JsonValue v && v.TryGetValue<string>(out var s) && allowed.Contains(s)) return;
        throw bad(name, $"is {n.ToJsonString()}, not one of {string.Join(", ", allowed)}");
    }

    /// <summary>Special tokens the post-processor adds to a single sequence (template items, or BERT/RoBERTa's two).</summary>
    public static int SpecialTokensAdded(JsonNode? pp, int depth = 0)
    {
        if (pp is not JsonObject o || depth > 8) return 0;
        string? type = o["type"] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
        return type switch
        {
            "TemplateProcessing" => o["single"] is JsonArray a ? a.Count(x => x is JsonObject item && item.ContainsKey("SpecialToken")) : 0,
            "BertProcessing" or "RobertaProcessing" => 2,
            "Sequence" => o["processors"] is JsonArray ps ? ps.Sum(x => SpecialTokensAdded(x, depth + 1)) : 0,
            _ => 0,
        };
    }

    /// <summary>The id of a token's text: an added token, else the model's vocabulary entry (null: not in the tokenizer).</summary>
    public static int? IdOf(JsonObject json, string content)
    {
        if (json["added_tokens"] is JsonArray added)
            foreach (var t in added)
                if (t is JsonObject o && o["content"] is JsonValue c && c.TryGetValue<string>(out var s) && s == content
                    && o["id"] is JsonValue idv && idv.TryGetValue<int>(out int id) && id >= 0) return id;
        if (json["model"] is JsonObject m)
        {
            if (m["vocab"] is JsonObject vocab && vocab[content] is JsonValue iv && iv.TryGetValue<int>(out int vid) && vid >= 0) return vid;
            if (m["vocab"] is JsonArray pieces)   // Unigram: [piece, score] pairs, the id is the index
                for (int i = 0; i < pieces.Count; i++)
                    if (pieces[i] is JsonArray pair && pair.Count > 0 && pair[0] is JsonValue pv && pv.TryGetValue<string>(out var piece) && piece == content) return i;
        }
        return null;
    }
}

/// <summary>
/// Where a model says which tokens end a generation, in the order transformers' `generate` reads it:
/// generation_config.json's eos_token_id (an id or a list: Llama 3 ends at either of two), else config.json's,
/// else the eos_token of tokenizer_config.json or special_tokens_map.json looked up in the tokenizer.
/// </summary>
public static class EosTokens
{
    public static int[] Find(string modelDir, JsonObject tokenizerJson)
    {
        foreach (var file in new[] { "generation_config.json", "config.json" })
            if (Read(modelDir, file) is JsonObject o && o["eos_token_id"] is JsonNode n)
                return Ids(Path.Combine(modelDir, file), n);
        foreach (var file in new[] { "tokenizer_config.json", "special_tokens_map.json" })
            if (Read(modelDir, file) is JsonObject o && o["eos_token"] is JsonNode n)
            {
                string? content = n is JsonValue v && v.TryGetValue<string>(out var s) ? s
                    : n is JsonObject t && t["content"] is JsonValue c && c.TryGetValue<string>(out var cs) ? cs : null;
                if (content is null) throw new LlmSnpException($"{Path.Combine(modelDir, file)}: field 'eos_token' is neither a string nor a token object");
                return TokenizerJson.IdOf(tokenizerJson, content) is int id ? new[] { id }
                    : throw new LlmSnpException($"{Path.Combine(modelDir, file)}: field 'eos_token' is '{content}', which the tokenizer.json beside it does not have");
            }
        return Array.Empty<int>();
    }

    static JsonObject? Read(string modelDir, string file)
    {
        string path = Path.Combine(modelDir, file);
        if (!File.Exists(path)) return null;
        try { return JsonNode.Parse(File.ReadAllBytes(path), documentOptions: new JsonDocumentOptions { MaxDepth = 64 }) as JsonObject ?? throw new LlmSnpException($"{path}: not a JSON object"); }
        catch (JsonException e) { throw new LlmSnpException($"{path}: not valid JSON ({e.Message.Split('\n')[0]})"); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidOperationException) { throw new LlmSnpException($"{path}: cannot read ({e.Message.Split('\n')[0]})"); }
    }

    static int[] Ids(string path, JsonNode n)
    {
        static int? One(JsonNode? x) => x is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out int i) && i >= 0 ? i : null;
        if (One(n) is int id) return new[] { id };
        if (n is JsonArray a && a.Count > 0 && a.All(x => One(x) is not null)) return a.Select(x => One(x)!.Value).ToArray();
        throw new LlmSnpException($"{path}: field 'eos_token_id' is {n.ToJsonString()}, not a token id or a list of them");
    }
}
