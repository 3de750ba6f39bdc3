using Microsoft.ML.Tokenizers;

namespace LlmSnp.Data;

/// <summary>
/// OPT's tokenizer: GPT-2 byte-level BPE with fairseq ids, `&lt;/s&gt;` (id 2) prepended, nothing appended.
/// </summary>
public sealed class OptTokenizer : ITextTokenizer
{
    // GPT-2's pre-tokenizer; byte-level BPE without it produces wrong ids.
    const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    public const int BosId = 2;
    readonly BpeTokenizer _bpe;

    public string Description { get; }
    int? ITextTokenizer.BosId => BosId;
    int? ITextTokenizer.EosId => BosId;   // OPT ends a sequence with the same </s>

    OptTokenizer(BpeTokenizer bpe, string description) { _bpe = bpe; Description = description; }

    /// <summary>The bundled OPT tokenizer (`tokenize` without --model).</summary>
    public static OptTokenizer Bundled() => Load(RepoPaths.OptTokenizer);

    public static OptTokenizer Load(string dir)
    {
        string vocab = Path.Combine(dir, "vocab.json"), merges = Path.Combine(dir, "merges.txt");
        foreach (var f in new[] { vocab, merges })
            if (!File.Exists(f)) throw new LlmSnpException($"{f}: tokenizer file not found");
        BpeTokenizer bpe;
        try
        {
            bpe = BpeTokenizer.Create(new BpeOptions(vocab, merges)
            {
                ByteLevel = true,
                PreTokenizer = new RegexPreTokenizer(new System.Text.RegularExpressions.Regex(Gpt2Pattern, System.Text.RegularExpressions.RegexOptions.Compiled), null),
                BeginningOfSentenceToken = "</s>",
            });
        }
        catch (Exception e) when (e is ArgumentException or FormatException or InvalidOperationException or System.Text.Json.JsonException)
        {
            throw new LlmSnpException($"{dir}: cannot load the BPE tokenizer ({e.Message.Split('\n')[0]})");
        }
        // An unknown BOS token is silently encoded as id 0: check it is really </s> = 2.
        if (bpe.EncodeToIds("a") is not [BosId, _]) throw new LlmSnpException($"{vocab}: '</s>' is not id {BosId}");
        return new OptTokenizer(bpe, $"{dir} (byte-level BPE)");
    }

    /// <summary>
    /// The longest run of non-space (or of space) characters encoded: the library's BPE removes merged symbols
    /// from a word one shift at a time, so a word costs the square of its length (1 MB of letters: 86 s). A
    /// run this long is not language (base64, a hex dump); it is refused rather than encoded for minutes.
    /// </summary>
    public const int MaxWordChars = 1 << 15;

    /// <summary>Ids with the leading bos (an empty text is the bos alone, as HF's OPT tokenizer gives).</summary>
    public int[] Encode(string text)
    {
        if (text.Length == 0) return new[] { BosId };
        int run = 0;
        bool space = false;
        for (int i = 0; i < text.Length; i++)
        {
            bool s = char.IsWhiteSpace(text[i]);
            run = s == space ? run + 1 : 1;
            space = s;
            if (run > MaxWordChars)
                throw new LlmSnpException($"{Description}: the text has a run of more than {MaxWordChars} {(s ? "whitespace" : "non-space")} characters at character {i - run + 1}; byte-level BPE's cost grows with the square of a word's length: split it");
        }
        return _bpe.EncodeToIds(text).ToArray();
    }

    /// <summary>Ids without the leading bos (the BPE tokenizer always adds it: Load checks).</summary>
    public int[] EncodeWithoutSpecialTokens(string text)
    {
        var ids = Encode(text);
        return ids.Length > 0 && ids[0] == BosId ? ids[1..] : ids;
    }

    public string Decode(IEnumerable<int> ids) => _bpe.Decode(ids) ?? "";
}
