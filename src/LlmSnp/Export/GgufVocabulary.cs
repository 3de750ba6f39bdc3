using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Models;

namespace LlmSnp.Export;

/// <summary>
/// A tokenizer as llama.cpp reads it from a GGUF file (`tokenizer.ggml.*`): a SentencePiece vocabulary (model `llama`:
/// pieces, scores, types) or a byte-level BPE one (model `gpt2`: tokens, types, merges and the pre-tokenizer's name).
/// Special ids of −1 are absent.
/// </summary>
public sealed record GgufVocabulary(List<string> Tokens, List<float> Scores, List<int> Types, int Bos, int Eos, int Unk, int Pad, bool AddBos, bool AddEos, bool AddSpacePrefix)
{
    /// <summary>`tokenizer.ggml.model`: `llama` (SentencePiece) or `gpt2` (byte-level BPE).</summary>
    public string Model { get; init; } = "llama";
    /// <summary>Byte-level BPE: the merges ("a b", by rank) and llama.cpp's name for the pre-tokenizer (`tokenizer.ggml.pre`).</summary>
    public IReadOnlyList<string>? Merges { get; init; }
    public string? Pre { get; init; }

    /// <summary>The checkpoint's SentencePiece `tokenizer.model`, padded with unused pieces to the embedding's rows.</summary>
    public static GgufVocabulary SentencePiece(string modelDir, ConfigFile cfg, int vocabSize)
    {
        string path = Path.Combine(modelDir, "tokenizer.model");
        if (!File.Exists(path))
            throw new LlmSnpException($"{path}: file not found; GGUF export needs the SentencePiece tokenizer.model (a tokenizer.json-only checkpoint, e.g. Qwen2's byte-level BPE, is not supported)");
        string added = Path.Combine(modelDir, "added_tokens.json");
        if (File.Exists(added)) throw new LlmSnpException($"{added}: added tokens beyond tokenizer.model are not exported");
        var spm = SentencePieceModel.Load(path);
        int n = spm.Pieces.Count;
        if (n > vocabSize) throw new LlmSnpException($"{path}: {n} pieces, more than config.json vocab_size {vocabSize}");

        bool addBos = true, addEos = false;
        string tcPath = Path.Combine(modelDir, "tokenizer_config.json");
        if (File.Exists(tcPath))
        {
            JsonObject tc;
            try
            {
                tc = JsonNode.Parse(File.ReadAllBytes(tcPath), documentOptions: new JsonDocumentOptions { MaxDepth = 32 }) as JsonObject
                    ?? throw new LlmSnpException($"{tcPath}: not a JSON object");
            }
            catch (JsonException e) { throw new LlmSnpException($"{tcPath}: not valid JSON ({e.Message.Split('\n')[0]})"); }
            addBos = JsonBool(tc, "add_bos_token", true, tcPath);
            addEos = JsonBool(tc, "add_eos_token", false, tcPath);
            if (tc["added_tokens_decoder"] is JsonObject dec)
                foreach (var kv in dec)
                    if (!int.TryParse(kv.Key, out int id) || id < 0 || id >= n)
                        throw new LlmSnpException($"{tcPath}: added token id '{kv.Key}' is not one of tokenizer.model's {n} pieces; added tokens are not exported");
        }

        int Special(string field, int fromProto)
        {
            int id = cfg.Has(field) ? cfg.Int(field, min: 0) : fromProto;
            if (id < 0 || id >= n) throw new LlmSnpException($"{cfg.Path}: {field} {id} is not a token of tokenizer.model ({n} pieces)");
            return id;
        }
        int bos = Special("bos_token_id", spm.BosId), eos = Special("eos_token_id", spm.EosId);
        if (spm.UnkId < 0 || spm.UnkId >= n) throw new LlmSnpException($"{path}: unk_id {spm.UnkId} is not one of its {n} pieces");
        int pad = cfg.Has("pad_token_id") ? Special("pad_token_id", -1) : (spm.PadId >= 0 && spm.PadId < n ? spm.PadId : -1);

        var tokens = spm.Pieces.Select(p => p.Piece).ToList();
        var scores = spm.Pieces.Select(p => p.Score).ToList();
        var types = spm.Pieces.Select(p => (int)p.Type).ToList();   // SentencePiece's type numbers are llama.cpp's token types
        // Embedding rows past the tokenizer (vocabulary padded for alignment): named as llama.cpp's converter names them.
        for (int i = n; i < vocabSize; i++) { tokens.Add($"[PAD{i}]"); scores.Add(-1000f); types.Add((int)SentencePieceModel.PieceType.Unused); }
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var t in tokens)
            if (!seen.Add(t)) throw new LlmSnpException($"{path}: piece '{t}' appears twice");
        return new GgufVocabulary(tokens, scores, types, bos, eos, spm.UnkId, pad, addBos, addEos, spm.AddDummyPrefix);
    }

    /// <summary>
    /// The pre-tokenizer regexes of HF tokenizer.json files (a `Split` before a regex-free `ByteLevel`) that llama.cpp
    /// knows by name; its own converter recognises them by hashing a tokenization, LlmSnp by the regex itself.
    /// </summary>
    static readonly IReadOnlyDictionary<string, string> PreTokenizers = new Dictionary<string, string>(StringComparer.Ordinal)
    {
        // Qwen2, Qwen2.5, Qwen3: digits one by one.
        [@"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"] = "qwen2",
        // Llama 3: digits in runs of up to three.
        [@"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"] = "llama-bpe",
    };

    /// <summary>
    /// The vocabulary a checkpoint ships: SentencePiece's tokenizer.model where there is one (Llama 2, Mistral, Gemma,
    /// Mixtral), else a byte-level BPE tokenizer.json (Llama 3, Qwen, TinyStories-656K).
    /// </summary>
    public static GgufVocabulary Of(string modelDir, ConfigFile cfg, int vocabSize) =>
        !File.Exists(Path.Combine(modelDir, "tokenizer.model")) && File.Exists(Path.Combine(modelDir, "tokenizer.json"))
            ? BytePairEncoding(modelDir, cfg, vocabSize)
            : SentencePiece(modelDir, cfg, vocabSize);

    /// <summary>
    /// A byte-level BPE `tokenizer.json` (Qwen2/Qwen3, Llama 3, GPT-2 style) as llama.cpp's `gpt2` vocabulary: the
    /// model's vocab and added tokens by id (added ones CONTROL when special or `<|…|>`-shaped, else USER_DEFINED, as
    /// llama.cpp's converter types them), `[PADi]` (UNUSED) for embedding rows no token names, the merges by rank, and the
    /// pre-tokenizer's llama.cpp name. What llama.cpp would tokenize differently is refused.
    /// </summary>
    public static GgufVocabulary BytePairEncoding(string modelDir, ConfigFile cfg, int vocabSize)
    {
        string path = Path.Combine(modelDir, "tokenizer.json");
        if (!File.Exists(path)) throw new LlmSnpException($"{path}: file not found; GGUF export of a byte-level BPE vocabulary needs tokenizer.json");
        JsonObject root;
        try
        {
            root = JsonNode.Parse(File.ReadAllBytes(path), documentOptions: new JsonDocumentOptions { MaxDepth = 64 }) as JsonObject
                ?? throw new LlmSnpException($"{path}: not a JSON object");
        }
        catch (JsonException e) { throw new LlmSnpException($"{path}: not valid JSON ({e.Message.Split('\n')[0]})"); }
        LlmSnpException Bad(string what) => new($"{path}: {what}");

        if (root["model"] is not JsonObject model || model["type"]?.GetValueKind() != JsonValueKind.String || (string)model["type"]! != "BPE")
            throw Bad("model.type is not \"BPE\"; only byte-level BPE tokenizer.json vocabularies are exported");
        if (Flag(model, "byte_fallback") || Text(model, "continuing_subword_prefix") is { Length: > 0 } || Text(model, "end_of_word_suffix") is { Length: > 0 })
            throw Bad("model has byte_fallback or subword affixes: not a byte-level BPE llama.cpp's gpt2 tokenizer reproduces");
        var normalizer = root["normalizer"];
        if (normalizer is not null && !(normalizer is JsonObject n && Text(n, "type") == "NFC"))
            throw Bad("normalizer is not null or NFC; llama.cpp's BPE tokenizer applies no other normalisation");
        string pre = PreTokenizerName(root["pre_tokenizer"], Bad);

        var tokens = new string?[vocabSize];
        var types = new int[vocabSize];
        if (model["vocab"] is not JsonObject vocab) throw Bad("model.vocab is not an object");
        foreach (var (token, idNode) in vocab)
        {
            int id = Id(idNode, $"model.vocab[\"{token}\"]", Bad);
            if (id >= vocabSize) throw new LlmSnpException($"{path}: token id {id} is past config.json vocab_size {vocabSize} ({cfg.Path})");
            if (tokens[id] is not null) throw Bad($"id {id} names two tokens");
            tokens[id] = token;
            types[id] = 1;   // NORMAL
        }
        if (root["added_tokens"] is JsonArray added)
            foreach (var a in added)
            {
                if (a is not JsonObject t || Text(t, "content") is not string content) throw Bad("added_tokens holds an entry without a content string");
                int id = Id(t["id"], $"added token '{content}'", Bad);
                if (id >= vocabSize) throw new LlmSnpException($"{path}: added token '{content}' has id {id}, past config.json vocab_size {vocabSize} ({cfg.Path})");
                if (tokens[id] is string other && other != content) throw Bad($"added token '{content}' reuses id {id} of '{other}'");
                tokens[id] = content;
                types[id] = Flag(t, "special") || (content.StartsWith("<|") && content.EndsWith("|>")) ? 3 : 4;   // CONTROL : USER_DEFINED
            }
        var list = new List<string>(vocabSize);
        for (int i = 0; i < vocabSize; i++)
        {
            if (tokens[i] is null) types[i] = 5;   // UNUSED: an embedding row past the tokenizer, named as llama.cpp's converter names it
            list.Add(tokens[i] ?? $"[PAD{i}]");
        }
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var t in list) if (!seen.Add(t)) throw Bad($"token '{t}' appears twice");

        if (model["merges"] is not JsonArray mergesNode) throw Bad("model.merges is not a list");
        var merges = new List<string>(mergesNode.Count);
        foreach (var m in mergesNode)
        {
            // "a b", or ["a", "b"] (tokenizers ≥ 0.20); a byte-level symbol never holds a space.
            string[]? pair = m is JsonValue v && v.TryGetValue<string>(out var str) ? str.Split(' ') : m is JsonArray arr && arr.Count == 2 ? arr.Select(x => x is JsonValue xv && xv.TryGetValue<string>(out var xs) ? xs : "").ToArray() : null;
            if (pair is not { Length: 2 } || pair.Any(x => x.Length == 0 || x.Contains(' '))) throw Bad($"merge {merges.Count} is not a pair of symbols");
            merges.Add(pair[0] + " " + pair[1]);
        }

        // bos: prepended where the post-processor's template starts with a special token (Llama 3) or tokenizer_config says
        // so; Qwen prepends nothing.
        int? templateBos = null;
        if (root["post_processor"] is JsonObject pp && Text(pp, "type") == "TemplateProcessing" && pp["single"] is JsonArray single
            && single.FirstOrDefault() is JsonObject first && first["SpecialToken"] is JsonObject st && Text(st, "id") is string bosText)
            templateBos = list.IndexOf(bosText) is int at && at >= 0 ? at : throw Bad($"post_processor prepends '{bosText}', which is not a token");
        bool addBos = templateBos is not null, addEos = false;
        string tcPath = Path.Combine(modelDir, "tokenizer_config.json");
        if (File.Exists(tcPath))
        {
            JsonObject tc;
            try
            {
                tc = JsonNode.Parse(File.ReadAllBytes(tcPath), documentOptions: new JsonDocumentOptions { MaxDepth = 32 }) as JsonObject
                    ?? throw new LlmSnpException($"{tcPath}: not a JSON object");
            }
            catch (JsonException e) { throw new LlmSnpException($"{tcPath}: not valid JSON ({e.Message.Split('\n')[0]})"); }
            addBos = JsonBool(tc, "add_bos_token", addBos, tcPath);
            addEos = JsonBool(tc, "add_eos_token", false, tcPath);
        }
        int Special(string field)
        {
            if (!cfg.Has(field)) return -1;
            int id = cfg.Int(field, min: 0);
            if (id >= vocabSize) throw new LlmSnpException($"{cfg.Path}: {field} {id} is past vocab_size {vocabSize}");
            return id;
        }
        int bos = templateBos ?? Special("bos_token_id");
        if (addBos && bos < 0) throw new LlmSnpException($"{tcPath}: add_bos_token is true but config.json names no bos_token_id");
        return new GgufVocabulary(list, new List<float>(), types.ToList(), bos, Special("eos_token_id"), -1, Special("pad_token_id"), addBos, addEos, false)
        {
            Model = "gpt2", Merges = merges, Pre = pre,
        };
    }

    /// <summary>llama.cpp's name for a tokenizer.json pre-tokenizer: a known `Split` regex before a regex-free ByteLevel, or GPT-2's own ByteLevel.</summary>
    static string PreTokenizerName(JsonNode? node, Func<string, LlmSnpException> bad)
    {
        var steps = node is JsonObject o && Text(o, "type") == "Sequence" && o["pretokenizers"] is JsonArray a ? a.ToList() : new List<JsonNode?> { node };
        var byteLevel = steps.OfType<JsonObject>().Where(s => Text(s, "type") == "ByteLevel").ToList();
        if (byteLevel.Count != 1) throw bad("pre_tokenizer has no ByteLevel step: not a byte-level BPE");
        if (Flag(byteLevel[0], "add_prefix_space")) throw bad("pre_tokenizer adds a prefix space, which llama.cpp's gpt2 tokenizer does not");
        if (steps.Count == 1)
        {
            // GPT-2's ByteLevel splits with its own regex (use_regex, default true).
            if (byteLevel[0]["use_regex"] is JsonNode && !Flag(byteLevel[0], "use_regex"))
                throw bad("pre_tokenizer is a ByteLevel without regex and no Split; llama.cpp has no such pre-tokenizer");
            return "gpt-2";
        }
        if (steps.Count == 2 && steps[0] is JsonObject split && Text(split, "type") == "Split" && Text(split, "behavior") == "Isolated" && !Flag(split, "invert")
            && split["pattern"] is JsonObject pattern && Text(pattern, "Regex") is string regex && ReferenceEquals(steps[1], byteLevel[0]) && !Flag(byteLevel[0], "use_regex"))
            return PreTokenizers.TryGetValue(regex, out var name) ? name
                : throw bad($"pre_tokenizer regex is not one llama.cpp knows by name (Qwen2/Qwen3's, Llama 3's)");
        throw bad("pre_tokenizer is not a Split regex followed by ByteLevel, nor GPT-2's ByteLevel");
    }

    static string? Text(JsonObject o, string field) => o[field] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;

    static bool Flag(JsonObject o, string field) => o[field] is JsonValue v && v.TryGetValue<bool>(out var b) && b;

    static int Id(JsonNode? n, string what, Func<string, LlmSnpException> bad) =>
        n is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out int id) && id >= 0 ? id
            : throw bad($"{what} has no non-negative integer id");

    static bool JsonBool(JsonObject o, string field, bool fallback, string path)
    {
        var n = o[field];
        if (n == null) return fallback;
        if (n is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind is JsonValueKind.True or JsonValueKind.False) return e.GetBoolean();
        throw new LlmSnpException($"{path}: field '{field}' is not true or false");
    }

    /// <summary>llama.cpp's tokenizer keys: SentencePiece (SPM) or byte-level BPE.</summary>
    public void Write(GgufWriter w)
    {
        bool spm = Model == "llama";
        w.AddString("tokenizer.ggml.model", Model);
        if (Pre is not null) w.AddString("tokenizer.ggml.pre", Pre);
        w.AddStringArray("tokenizer.ggml.tokens", Tokens);
        if (spm) w.AddFloat32Array("tokenizer.ggml.scores", Scores);
        w.AddInt32Array("tokenizer.ggml.token_type", Types);
        if (Merges is not null) w.AddStringArray("tokenizer.ggml.merges", Merges);
        if (Bos >= 0) w.AddUInt32("tokenizer.ggml.bos_token_id", (uint)Bos);
        if (Eos >= 0) w.AddUInt32("tokenizer.ggml.eos_token_id", (uint)Eos);
        if (Unk >= 0) w.AddUInt32("tokenizer.ggml.unknown_token_id", (uint)Unk);
        if (Pad >= 0) w.AddUInt32("tokenizer.ggml.padding_token_id", (uint)Pad);
        w.AddBool("tokenizer.ggml.add_bos_token", AddBos);
        w.AddBool("tokenizer.ggml.add_eos_token", AddEos);
        if (spm) w.AddBool("tokenizer.ggml.add_space_prefix", AddSpacePrefix);
    }
}
