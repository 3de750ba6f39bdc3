using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Models;

namespace LlmSnp.Export;

/// <summary>A tokenizer as llama.cpp reads it from a GGUF file (`tokenizer.ggml.*`).</summary>
public sealed record GgufVocabulary(List<string> Tokens, List<float> Scores, List<int> Types, int Bos, int Eos, int Unk, int Pad, bool AddBos, bool AddEos, bool AddSpacePrefix)
{
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

    static bool JsonBool(JsonObject o, string field, bool fallback, string path)
    {
        var n = o[field];
        if (n == null) return fallback;
        if (n is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind is JsonValueKind.True or JsonValueKind.False) return e.GetBoolean();
        throw new LlmSnpException($"{path}: field '{field}' is not true or false");
    }

    /// <summary>llama.cpp's SentencePiece (SPM) tokenizer keys.</summary>
    public void Write(GgufWriter w)
    {
        w.AddString("tokenizer.ggml.model", "llama");
        w.AddStringArray("tokenizer.ggml.tokens", Tokens);
        w.AddFloat32Array("tokenizer.ggml.scores", Scores);
        w.AddInt32Array("tokenizer.ggml.token_type", Types);
        w.AddUInt32("tokenizer.ggml.bos_token_id", (uint)Bos);
        w.AddUInt32("tokenizer.ggml.eos_token_id", (uint)Eos);
        w.AddUInt32("tokenizer.ggml.unknown_token_id", (uint)Unk);
        if (Pad >= 0) w.AddUInt32("tokenizer.ggml.padding_token_id", (uint)Pad);
        w.AddBool("tokenizer.ggml.add_bos_token", AddBos);
        w.AddBool("tokenizer.ggml.add_eos_token", AddEos);
        w.AddBool("tokenizer.ggml.add_space_prefix", AddSpacePrefix);
    }
}
