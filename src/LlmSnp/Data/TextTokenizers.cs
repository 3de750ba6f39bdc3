using System.Text.Json;
using Microsoft.ML.Tokenizers;

namespace LlmSnp.Data;

/// <summary>A checkpoint's tokenizer: text → ids as the model was trained (bos prepended where the model's tokenizer does).</summary>
public interface ITextTokenizer
{
    /// <summary>What was loaded, for reports: the file and its kind.</summary>
    string Description { get; }
    int? BosId { get; }
    int? EosId { get; }
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
        if (File.Exists(F("tokenizer.json"))) return HfTokenizer.Load(F("tokenizer.json"));
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
            using var s = File.OpenRead(path);
            return new SentencePieceTokenizer(LlamaTokenizer.Create(s, addBeginOfSentence: addBos, addEndOfSentence: false), $"{path} (SentencePiece)");
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
    public int[] Encode(string text) => _sp.EncodeToIds(text, considerPreTokenization: false, considerNormalization: true).ToArray();

    public int[] EncodeWithoutSpecialTokens(string text) =>
        _sp.EncodeToIds(text, addBeginningOfSentence: false, addEndOfSentence: false, considerPreTokenization: false, considerNormalization: true).ToArray();

    public string Decode(IEnumerable<int> ids) => _sp.Decode(ids) ?? "";
}

/// <summary>A HF `tokenizer.json` through the HF tokenizers library itself (Tokenizers.DotNet binding).</summary>
public sealed class HfTokenizer : ITextTokenizer, IDisposable
{
    readonly Tokenizers.DotNet.Tokenizer _tok;
    public string Description { get; }
    public int? BosId { get; }
    public int? EosId => null;

    readonly string _path;

    HfTokenizer(Tokenizers.DotNet.Tokenizer tok, string path, int? bos) { _tok = tok; _path = path; Description = $"{path} (HF tokenizers)"; BosId = bos; }

    public static HfTokenizer Load(string path)
    {
        Tokenizers.DotNet.Tokenizer tok;
        try { tok = new Tokenizers.DotNet.Tokenizer(path); }
        catch (Tokenizers.DotNet.TokenizerException e) { throw new LlmSnpException($"{path}: cannot load the tokenizer ({e.Message.Split('\n')[0]})"); }
        // The post-processor decides what is prepended: the first id of an empty text is the bos, if any.
        var empty = tok.Encode("");
        return new HfTokenizer(tok, path, empty.Length > 0 ? (int)empty[0] : null);
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
