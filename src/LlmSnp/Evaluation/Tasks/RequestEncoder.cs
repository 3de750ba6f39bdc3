using LlmSnp.Data;

namespace LlmSnp.Evaluation.Tasks;

/// <summary>`--add-bos`: the tokenizer's own default (lm-eval's pinned behaviour), or bos forced on or off for every encoding.</summary>
public enum BosPolicy { Auto, True, False }

public static class BosPolicies
{
    public static BosPolicy Parse(string s) => s switch
    {
        "auto" => BosPolicy.Auto, "true" => BosPolicy.True, "false" => BosPolicy.False,
        _ => throw new LlmSnpException($"--add-bos: '{s}' is not auto, true or false"),
    };

    public static string Name(BosPolicy p) => p.ToString().ToLowerInvariant();
}

/// <summary>
/// Token ids of one loglikelihood request, as lm-evaluation-harness (4e7e0d4) forms them: `TemplateLM.loglikelihood`,
/// `_encode_pair` and `HFLM.tok_encode`. The context and continuation are tokenized as one string and the context's
/// own tokens cut off its front (a merge across the boundary is scored the way the model sees it); trailing context
/// whitespace moves to the continuation; an empty context becomes the prefix token (bos, else eos) before the
/// continuation encoded without special tokens.
/// </summary>
public sealed class RequestEncoder
{
    readonly ITextTokenizer _tok;
    readonly BosPolicy _bos;
    readonly int? _prefix;
    readonly string? _bosText;
    readonly Dictionary<string, int[]> _contexts = new(StringComparer.Ordinal);

    /// <summary>The token an empty context becomes (HF `prefix_token_id`: the tokenizer's bos, else its eos); null where it has neither.</summary>
    public int? PrefixTokenId => _prefix;

    /// <param name="fallbackPrefix">The model config's eos (then bos) token id, for a tokenizer that names neither.</param>
    public RequestEncoder(ITextTokenizer tokenizer, BosPolicy bos, int? fallbackPrefix = null)
    {
        _tok = tokenizer; _bos = bos;
        _prefix = tokenizer.BosId ?? tokenizer.EosId ?? fallbackPrefix;
        // tok_encode: a string that already starts with the prefix token's text gets no special tokens.
        string? text = _prefix is int p ? tokenizer.Decode(new[] { p }) : null;
        _bosText = string.IsNullOrEmpty(text) ? null : text;
    }

    /// <summary>HF `tok_encode(string)`: special tokens as the tokenizer adds them, or as --add-bos forces.</summary>
    public int[] TokEncode(string s)
    {
        if (_bosText != null && s.StartsWith(_bosText, StringComparison.Ordinal)) return _tok.EncodeWithoutSpecialTokens(s);
        switch (_bos)
        {
            case BosPolicy.False: return _tok.EncodeWithoutSpecialTokens(s);
            case BosPolicy.True:
                {
                    var ids = _tok.Encode(s);
                    if (_tok.BosId is not int b || (ids.Length > 0 && ids[0] == b)) return ids;
                    return ids.Prepend(b).ToArray();
                }
            default: return _tok.Encode(s);
        }
    }

    /// <summary>(context tokens, continuation tokens) of one request; the continuation may come out empty where the context's last token absorbs it.</summary>
    public (int[] Context, int[] Continuation) Encode(string context, string continuation)
    {
        if (context.Length == 0)
        {
            if (_prefix is not int p) throw new LlmSnpException("the tokenizer has neither a bos nor an eos token (and config.json names none): an empty context cannot be scored");
            var cont = _tok.EncodeWithoutSpecialTokens(continuation);
            // A continuation that itself starts with the prefix token keeps it as its context.
            return cont.Length > 0 && cont[0] == p ? (new[] { p }, cont[1..]) : (new[] { p }, cont);
        }
        int spaces = context.Length - RStrip(context).Length;
        if (spaces > 0)
        {
            continuation = context[^spaces..] + continuation;
            context = context[..^spaces];
        }
        var whole = TokEncode(context + continuation);
        if (!_contexts.TryGetValue(context, out var ctx)) _contexts[context] = ctx = TokEncode(context);
        return (ctx, whole.Length > ctx.Length ? whole[ctx.Length..] : Array.Empty<int>());
    }

    /// <summary>Python's str.rstrip(): whitespace as str.isspace() sees it (which adds U+001C–U+001F to .NET's).</summary>
    public static string RStrip(string s)
    {
        int end = s.Length;
        while (end > 0 && (char.IsWhiteSpace(s[end - 1]) || s[end - 1] is >= '\u001c' and <= '\u001f')) end--;
        return s[..end];
    }
}
