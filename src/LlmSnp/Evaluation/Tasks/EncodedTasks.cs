using LlmSnp.Data;

namespace LlmSnp.Evaluation.Tasks;

/// <summary>The tasks' documents as packed rows of token ids for one model (its tokenizer and context length).</summary>
public sealed class EncodedTasks
{
    public IReadOnlyList<TaskSet> Tasks { get; }
    /// <summary>One row per document, tasks in order.</summary>
    public IReadOnlyList<DocRow> Rows { get; }
    /// <summary>lm-eval's max_length: the model's context (max_position_embeddings).</summary>
    public int MaxLength { get; }
    public BosPolicy Bos { get; }
    public int? PrefixTokenId { get; }
    /// <summary>Requests cut from the left to fit the context.</summary>
    public int Truncated { get; }
    public int Requests => Rows.Sum(r => r.Scored.Length);
    /// <summary>Tokens of all rows (each shared context counted once), and what one forward per request would run.</summary>
    public long Tokens => Rows.Sum(r => (long)r.Length);
    public long UnsharedTokens => Rows.Sum(r => r.UnsharedTokens);

    EncodedTasks(IReadOnlyList<TaskSet> tasks, IReadOnlyList<DocRow> rows, int maxLength, BosPolicy bos, int? prefix, int truncated)
    {
        Tasks = tasks; Rows = rows; MaxLength = maxLength; Bos = bos; PrefixTokenId = prefix; Truncated = truncated;
    }

    /// <param name="fallbackPrefix">The model config's eos / bos token id, for a tokenizer that names neither (an empty context needs one).</param>
    public static EncodedTasks Encode(IReadOnlyList<TaskSet> tasks, ITextTokenizer tokenizer, int maxLength, BosPolicy bos, int? fallbackPrefix = null)
    {
        if (maxLength < 1) throw new LlmSnpException($"the model's context ({maxLength} tokens) cannot hold a request");
        var encoder = new RequestEncoder(tokenizer, bos, fallbackPrefix);
        var rows = new List<DocRow>();
        int truncated = 0;
        for (int t = 0; t < tasks.Count; t++)
        {
            var task = tasks[t];
            for (int d = 0; d < task.Docs.Count; d++)
            {
                var doc = task.Docs[d];
                var requests = new ScoredRequest[doc.Requests.Count];
                for (int k = 0; k < requests.Length; k++)
                {
                    var (context, continuation) = doc.Requests[k];
                    var (ctx, cont) = encoder.Encode(context, continuation);
                    string where = $"{task.Name} doc {doc.DocId} (line {doc.Line}), choice {k}";
                    // lm-eval asserts on all three; here each is one clear line.
                    if (ctx.Length == 0) throw new LlmSnpException($"{where}: the context encodes to no token (the tokenizer adds no bos; try --add-bos true)");
                    if (cont.Length == 0) throw new LlmSnpException($"{where}: the continuation adds no token after the context's (its text merged into the context's last token)");
                    if (cont.Length > maxLength)
                        throw new LlmSnpException($"{where}: the continuation is {cont.Length} tokens, more than the model's context of {maxLength} (max_position_embeddings); it cannot be scored");
                    var full = ctx.Concat(cont).ToArray();
                    if (full.Length > maxLength + 1) { full = full[^(maxLength + 1)..]; truncated++; }
                    requests[k] = new ScoredRequest(full[..^1], cont);
                }
                rows.Add(DocRow.Pack(t, d, requests));
            }
        }
        return new EncodedTasks(tasks, rows, maxLength, bos, encoder.PrefixTokenId, truncated);
    }
}

/// <summary>Per request of each row: the continuation's loglikelihood and whether greedy decoding would produce it.</summary>
public sealed class TaskResults
{
    public double[][] LogLikelihood { get; }
    public bool[][] Greedy { get; }

    public TaskResults(EncodedTasks tasks)
    {
        LogLikelihood = tasks.Rows.Select(r => Enumerable.Repeat(double.NaN, r.Scored.Length).ToArray()).ToArray();
        Greedy = tasks.Rows.Select(r => new bool[r.Scored.Length]).ToArray();
    }
}
