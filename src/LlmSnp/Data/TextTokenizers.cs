using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.ML.Tokenizers;

namespace LlmSnp.Data;

/// <summary>A checkpoint's tokenizer: text → ids as the model was trained (bos prepended where the model's tokenizer does).</summary>
public interface ITextTokenizer
{
    /// <summary>What was loaded, for reports: the file and its kind.</summary>
    string Description { get; }
    int? BosId { get; }
    int? EosId { get; }
    /// <summary>Every id that ends a generation (Llama 3's generation_config lists several).</summary>
    IReadOnlyList<int> EosIds => EosId is int e ? new[] { e } : Array.Empty<int>();
    int[] Encode(string text);
    string Decode(IEnumerable<int> ids);

    /// <summary>
    /// Ids without the special tokens <see cref="Encode"/> adds (HF `add_special_tokens=False`). This default strips what
    /// the tokenizer puts around every text, found from an empty and a one-letter text; a tokenizer that can encode
    /// without them overrides it.
    /// </summary>
    int[] EncodeWithoutSpecialTokens(string text) => SpecialTokens.Strip(Encode(text), Encode(""), Encode("a"));
}

/// <summary>What a tokenizer adds around every text: the common start of its encodings of "" and "a", and the rest of "" after it.</summary>
public static class SpecialTokens
{
    public static int[] Strip(int[] ids, int[] ofEmpty, int[] ofLetter)
    {
        int prefix = 0;
        while (prefix < ofEmpty.Length && prefix < ofLetter.Length && ofEmpty[prefix] == ofLetter[prefix]) prefix++;
        var lead = ofEmpty.AsSpan(0, prefix);
        var trail = ofEmpty.AsSpan(prefix);
        var s = ids.AsSpan();
        if (s.StartsWith(lead)) s = s[lead.Length..];
        if (trail.Length > 0 && s.EndsWith(trail)) s = s[..^trail.Length];
        return s.ToArray();
    }
}

/// <summary>
/// Finds a checkpoint's own tokenizer: `vocab.json` + `merges.txt` (OPT's byte-level BPE),
/// `tokenizer.model` (SentencePiece, Llama 2 / Mistral) or `tokenizer.json` (HF tokenizers, Llama 3 /
/// Qwen2). A directory with none is an error: another model's tokenizer would give wrong ids silently.
/// </summary>
public static class TextTokenizers
{
    public static ITextTokenizer ForModel(string modelDir)
    {
        string F(string name) => Path.Combine(modelDir, name);
        if (File.Exists(F("vocab.json")) && File.Exists(F("merges.txt"))) return OptTokenizer.Load(modelDir);
        if (File.Exists(F("tokenizer.model"))) return SentencePieceTokenizer.Load(F("tokenizer.model"), AddBos(modelDir));
        if (File.Exists(F("tokenizer.json"))) return HfTokenizer.Load(F("tokenizer.json"), modelDir);
        throw new LlmSnpException($"{modelDir}: no tokenizer (vocab.json + merges.txt, tokenizer.model or tokenizer.json)");
    }

    /// <summary>tokenizer_config.json's add_bos_token (HF LlamaTokenizer default: true).</summary>
    static bool AddBos(string modelDir)
    {
        string path = Path.Combine(modelDir, "tokenizer_config.json");
        if (!File.Exists(path)) return true;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
            return doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty("add_bos_token", out var v)
                || v.ValueKind != JsonValueKind.False;
        }
        catch (JsonException e) { throw new LlmSnpException($"{path}: not valid JSON ({e.Message.Split('\n')[0]})"); }
    }
}

/// <summary>SentencePiece `tokenizer.model` through Microsoft.ML.Tokenizers' LlamaTokenizer (verified id-exact against SentencePiece).</summary>
public sealed class SentencePieceTokenizer : ITextTokenizer
{
    readonly LlamaTokenizer _sp;
    public string Description { get; }
    public int? BosId => _sp.BeginningOfSentenceId;
    public int? EosId => _sp.EndOfSentenceId;

    SentencePieceTokenizer(LlamaTokenizer sp, string description) { _sp = sp; Description = description; }

    public static SentencePieceTokenizer Load(string path, bool addBos)
    {
        try
        {
            // SentencePiece matches user-defined pieces (Gemma's <start_of_turn>, …) whole in any text; LlamaTokenizer does so
            // only for the pieces it is given as special tokens (otherwise they fall back to bytes).
            var userDefined = Export.SentencePieceModel.Load(path).Pieces.Select((p, id) => (p, id))
                .Where(x => x.p.Type == Export.SentencePieceModel.PieceType.UserDefined).ToDictionary(x => x.p.Piece, x => x.id);
            using var s = File.OpenRead(path);
            return new SentencePieceTokenizer(LlamaTokenizer.Create(s, addBeginOfSentence: addBos, addEndOfSentence: false,
                specialTokens: userDefined.Count > 0 ? userDefined : null), $"{path} (SentencePiece)");
        }
        // NullReferenceException: LlamaTokenizer.Create dereferences trainer_spec / normalizer_spec unchecked, and a
        // protobuf cut at a field boundary (or an empty file) parses without them (found by the fuzzer).
        catch (Exception e) when (e is ArgumentException or FormatException or InvalidOperationException or IOException
            or NotSupportedException or NullReferenceException or Google.Protobuf.InvalidProtocolBufferException)
        {
            throw new LlmSnpException($"{path}: cannot load the SentencePiece model ({e.Message.Split('\n')[0]})");
        }
    }

    // SentencePiece itself does no pre-tokenization; its normaliser (whitespace, dummy prefix) applies.
    // An empty text still gets the bos the tokenizer adds (HF LlamaTokenizer("") is [bos]); the library returns nothing.
    public int[] Encode(string text) => text.Length == 0
        ? (_sp.AddBeginningOfSentence ? new[] { _sp.BeginningOfSentenceId } : Array.Empty<int>())
        : _sp.EncodeToIds(text, considerPreTokenization: false, considerNormalization: true).ToArray();

    public int[] EncodeWithoutSpecialTokens(string text) =>
        _sp.EncodeToIds(text, addBeginningOfSentence: false, addEndOfSentence: false, considerPreTokenization: false, considerNormalization: true).ToArray();

    public string Decode(IEnumerable<int> ids) => _sp.Decode(ids) ?? "";
}

/// <summary>
/// A HF `tokenizer.json` through the HF tokenizers library itself (Tokenizers.DotNet binding). The file is checked
/// before the library sees it: its truncation and padding options can make the library panic (a Rust panic
/// aborts the process), and they are not applied anyway — transformers turns them off for a call without
/// truncation or padding, and LlmSnp windows the ids itself — so the library gets the file without them.
/// </summary>
public sealed class HfTokenizer : ITextTokenizer, IDisposable
{
    readonly Tokenizers.DotNet.Tokenizer _tok;
    public string Description { get; }
    public int? BosId { get; }
    public int? EosId => EosIds.Count > 0 ? EosIds[0] : null;
    public IReadOnlyList<int> EosIds { get; }

    readonly string _path;

    HfTokenizer(Tokenizers.DotNet.Tokenizer tok, string path, int? bos, IReadOnlyList<int> eos)
    {
        _tok = tok; _path = path; Description = $"{path} (HF tokenizers)"; BosId = bos; EosIds = eos;
    }

    /// <summary>A tokenizer.json larger than this is not a tokenizer (the largest hub vocabularies are ~30 MB).</summary>
    const long MaxBytes = 512L << 20;

    /// <param name="modelDir">The model directory, for the eos ids (generation_config.json, config.json, tokenizer_config.json); null: none.</param>
    public static HfTokenizer Load(string path, string? modelDir = null)
    {
        var json = TokenizerJson.Read(path, MaxBytes);
        TokenizerJson.CheckOptions(path, json);
        string? stripped = null;
        Tokenizers.DotNet.Tokenizer tok;
        try
        {
            string load = path;
            if (json["truncation"] is not null || json["padding"] is not null)
            {
                json["truncation"] = null;
                json["padding"] = null;
                stripped = Path.Combine(Path.GetTempPath(), $"llmsnp-tokenizer-{Guid.NewGuid():N}.json");
                File.WriteAllText(stripped, json.ToJsonString());
                load = stripped;
            }
            try { tok = new Tokenizers.DotNet.Tokenizer(load); }
            catch (Tokenizers.DotNet.TokenizerException e) { throw new LlmSnpException($"{path}: cannot load the tokenizer ({e.Message.Split('\n')[0]})"); }
        }
        finally { if (stripped != null) File.Delete(stripped); }
        // The post-processor decides what is prepended: the first id of an empty text is the bos, if any.
        var empty = tok.Encode("");
        var eos = modelDir == null ? Array.Empty<int>() : EosTokens.Find(modelDir, json);
        return new HfTokenizer(tok, path, empty.Length > 0 ? (int)empty[0] : null, eos);
    }

    // A tokenizer.json that loads can still fail on the first real text (e.g. a WordLevel unk_token missing from its vocab).
    public int[] Encode(string text)
    {
        try { return _tok.Encode(text).Select(i => (int)i).ToArray(); }
        catch (Tokenizers.DotNet.TokenizerException e) { throw new LlmSnpException($"{_path}: cannot encode text ({e.Message.Split('\n')[0]})"); }
    }

    int[]? _ofEmpty, _ofLetter;

    /// <summary>The post-processor's tokens removed (the HF binding encodes with them always).</summary>
    public int[] EncodeWithoutSpecialTokens(string text) =>
        SpecialTokens.Strip(Encode(text), _ofEmpty ??= Encode(""), _ofLetter ??= Encode("a"));

    public string Decode(IEnumerable<int> ids)
    {
        try { return _tok.Decode(ids.Select(i => (uint)i).ToArray()); }
        catch (Tokenizers.DotNet.TokenizerException e) { throw new LlmSnpException($"{_path}: cannot decode ids ({e.Message.Split('\n')[0]})"); }
    }

    public void Dispose() => _tok.Dispose();
}
