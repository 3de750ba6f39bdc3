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

    /// <summary>Ids with the leading bos.</summary>
    public int[] Encode(string text) => _bpe.EncodeToIds(text).ToArray();

    /// <summary>Ids without the leading bos (the BPE tokenizer always adds it: Load checks).</summary>
    public int[] EncodeWithoutSpecialTokens(string text)
    {
        var ids = Encode(text);
        return ids.Length > 0 && ids[0] == BosId ? ids[1..] : ids;
    }

    public string Decode(IEnumerable<int> ids) => _bpe.Decode(ids) ?? "";
}
