namespace LlmSnp.Evaluation.Tasks;

/// <summary>
/// One request as the model scores it: lm-eval's input (context + continuation, cut from the left to the model's
/// context + 1 tokens, the last token dropped) and the continuation tokens its last logits are scored against.
/// </summary>
public sealed record ScoredRequest(int[] Input, int[] Continuation)
{
    /// <summary>Index in <see cref="Input"/> of the first logit scored (the one predicting the continuation's first token).</summary>
    public int FirstScored => Input.Length - Continuation.Length;
}

/// <summary>
/// One document packed as a row: the tokens its requests share (the longest common start of their inputs, up to the
/// first scored position of any) once, then each request's remaining tokens. Each request's tokens attend to the shared
/// part and causally to themselves, at the positions they hold in their own sequence, so the row computes exactly what
/// one forward per request would, with the context run once.
/// </summary>
public sealed class DocRow
{
    public int Task { get; }
    public int Doc { get; }
    public int[] Ids { get; }
    public long[] Positions { get; }
    /// <summary>0: the shared part; k + 1: request k's own tokens.</summary>
    public int[] Segments { get; }
    /// <summary>Per request: where its first scored logit lies in the row, and the tokens scored.</summary>
    public (int Start, int[] Targets)[] Scored { get; }
    public int Length => Ids.Length;
    public int Shared { get; }

    DocRow(int task, int doc, int[] ids, long[] positions, int[] segments, (int, int[])[] scored, int shared)
    {
        Task = task; Doc = doc; Ids = ids; Positions = positions; Segments = segments; Scored = scored; Shared = shared;
    }

    public static DocRow Pack(int task, int doc, IReadOnlyList<ScoredRequest> requests)
    {
        int shared = requests.Min(r => r.FirstScored);
        var first = requests[0].Input;
        foreach (var r in requests.Skip(1))
        {
            int n = 0;
            while (n < shared && r.Input[n] == first[n]) n++;
            shared = n;
        }
        int length = shared + requests.Sum(r => r.Input.Length - shared);
        var ids = new int[length];
        var pos = new long[length];
        var seg = new int[length];
        var scored = new (int, int[])[requests.Count];
        for (int i = 0; i < shared; i++) { ids[i] = first[i]; pos[i] = i; }
        int at = shared;
        for (int k = 0; k < requests.Count; k++)
        {
            var r = requests[k];
            scored[k] = (at + r.FirstScored - shared, r.Continuation);
            for (int i = shared; i < r.Input.Length; i++, at++) { ids[at] = r.Input[i]; pos[at] = i; seg[at] = k + 1; }
        }
        return new DocRow(task, doc, ids, pos, seg, scored, shared);
    }

    /// <summary>(query, key) pairs the row's attention reads: the shared part causally, each request's tokens over it and causally over themselves.</summary>
    public long AttendedPairs
    {
        get
        {
            long p = Shared, n = p * (p + 1) / 2;
            foreach (var g in Segments.Skip(Shared).GroupBy(s => s))
            {
                long m = g.Count();
                n += m * p + m * (m + 1) / 2;
            }
            return n;
        }
    }

    /// <summary>Tokens each request would cost in a forward of its own (what sharing the context saves).</summary>
    public long UnsharedTokens => Segments.Skip(Shared).GroupBy(s => s).Sum(g => (long)g.Count() + Shared);
}
