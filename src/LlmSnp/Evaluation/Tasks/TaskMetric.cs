using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Evaluation.Tasks;

/// <summary>
/// Zero-shot task accuracy, streamed like perplexity: every document's row moves through each block together with
/// all the others (one block resident), rows of similar length padded into micro-batches of about
/// <see cref="TokensPerBatch"/> tokens so that each linear layer is one large GEMM, and a document's choices share its
/// context inside the row (<see cref="DocRow"/>). The head runs only where a continuation token is scored.
/// <see cref="IStreamedMetric.Finish"/> gives the mean accuracy (%) over the tasks of the rows it was given, and
/// fills <see cref="Results"/>.
/// </summary>
public sealed class TaskMetric : IStreamedMetric, IDisposable
{
    /// <summary>Tokens (padding included) per micro-batch: GEMMs of this many rows run near the machine's peak.</summary>
    public const int TokensPerBatch = 4096;

    /// <summary>Logit elements formed at once in the head (64 MiB in float32).</summary>
    const long HeadElements = 1L << 24;

    readonly EncodedTasks _tasks;
    readonly int[] _rows;
    readonly List<Batch> _batches = new();

    sealed record Batch(int[] Rows, int Length, Tensor Ids, Tensor Positions, Tensor Segments) : IDisposable
    {
        public void Dispose() { Ids.Dispose(); Positions.Dispose(); Segments.Dispose(); }
    }

    public string Name => "mean accuracy";
    public bool HigherIsBetter => true;
    public TaskResults Results { get; }
    public EncodedTasks Tasks => _tasks;
    /// <summary>The scores of the last <see cref="Finish"/>.</summary>
    public TaskSummary? LastSummary { get; private set; }
    /// <summary>Tokens the micro-batches hold, padding included.</summary>
    public long PaddedTokens => _batches.Sum(b => (long)b.Rows.Length * b.Length);

    /// <param name="rows">The rows to stream (indices into <see cref="EncodedTasks.Rows"/>); all by default.</param>
    /// <param name="results">Where the loglikelihoods go (shared by the groups of one evaluation); a new one by default.</param>
    public TaskMetric(EncodedTasks tasks, IReadOnlyList<int>? rows = null, TaskResults? results = null)
    {
        _tasks = tasks;
        Results = results ?? new TaskResults(tasks);
        // Longest first (as lm-eval orders its requests): each micro-batch pads to its first row.
        _rows = (rows ?? Enumerable.Range(0, tasks.Rows.Count).ToList()).OrderByDescending(r => tasks.Rows[r].Length).ThenBy(r => r).ToArray();
        for (int at = 0; at < _rows.Length;)
        {
            int length = tasks.Rows[_rows[at]].Length;
            int n = Math.Clamp(TokensPerBatch / length, 1, _rows.Length - at);
            var members = _rows.AsSpan(at, n).ToArray();
            at += n;
            var ids = new long[n * length];
            var pos = new long[n * length];
            var seg = Enumerable.Repeat(-1L, n * length).ToArray();   // padding: a segment of its own
            for (int i = 0; i < n; i++)
            {
                var row = tasks.Rows[members[i]];
                for (int j = 0; j < row.Length; j++)
                {
                    ids[i * length + j] = row.Ids[j];
                    pos[i * length + j] = row.Positions[j];
                    seg[i * length + j] = row.Segments[j];
                }
            }
            var shape = new long[] { n, length };
            _batches.Add(new Batch(members, length, torch.tensor(ids, shape), torch.tensor(pos, shape), torch.tensor(seg, shape)));
        }
    }

    /// <summary>Rows of the given tasks grouped so that each group's hidden states take at most <paramref name="bytes"/> (longest rows first).</summary>
    public static List<int[]> Groups(EncodedTasks tasks, long bytesPerToken, long bytes)
    {
        var order = Enumerable.Range(0, tasks.Rows.Count).OrderByDescending(r => tasks.Rows[r].Length).ThenBy(r => r).ToArray();
        var groups = new List<int[]>();
        var current = new List<int>();
        long held = 0;
        foreach (var r in order)
        {
            long cost = tasks.Rows[r].Length * bytesPerToken;
            if (current.Count > 0 && held + cost > bytes) { groups.Add(current.ToArray()); current.Clear(); held = 0; }
            current.Add(r);
            held += cost;
        }
        if (current.Count > 0) groups.Add(current.ToArray());
        return groups;
    }

    static ILanguageModel Language(IPrunableModel model) =>
        model as ILanguageModel ?? throw new LlmSnpException($"{model.ModelDir}: task evaluation needs a language model");

    public List<Tensor> Embed(IPrunableModel model)
    {
        var lm = Language(model);
        return _batches.Select(b => lm.EmbedAt(b.Ids.to(model.Device), b.Positions.to(model.Device))).ToList();
    }

    /// <summary>
    /// [batch, t, t] true where query i reads key j: j at or before i in the row, and j in the shared context or in i's own
    /// request. Padding is a segment of its own after every real token, so it sees at least itself and is never seen.
    /// </summary>
    static Tensor Mask(Tensor segments)
    {
        long t = segments.shape[1];
        var i = torch.arange(t, device: segments.device);
        var causal = i.unsqueeze(1) >= i.unsqueeze(0);
        var key = segments.unsqueeze(1);
        return causal.unsqueeze(0).logical_and(key.eq(0).logical_or(key.eq(segments.unsqueeze(2))));
    }

    public void Advance(IPrunableBlock block, List<Tensor> hidden)
    {
        if (block is not ICachedBlock decoder) throw new LlmSnpException("task evaluation needs decoder blocks with a packed-row forward (ICachedBlock.ForwardMasked)");
        for (int k = 0; k < hidden.Count; k++)
        {
            using var scope = NewDisposeScope();
            var b = _batches[k];
            var device = hidden[k].device;
            var next = decoder.ForwardMasked(hidden[k], b.Positions.to(device), Mask(b.Segments.to(device)));
            hidden[k].Dispose();
            hidden[k] = next.MoveToOuterDisposeScope();
        }
    }

    public double Finish(IPrunableModel model, List<Tensor> hidden)
    {
        for (int k = 0; k < hidden.Count; k++)
        {
            Score(model, _batches[k], hidden[k]);
            hidden[k].Dispose();
        }
        foreach (var r in _rows)
            foreach (var ll in Results.LogLikelihood[r])
                if (!double.IsFinite(ll)) throw new LlmSnpException("a loglikelihood is not finite (the model produced non-finite logits)");
        LastSummary = TaskScoring.Score(_tasks, Results, _rows);
        return 100 * LastSummary.MeanAcc;
    }

    /// <summary>Per task: acc (%), the columns of a comparison row.</summary>
    public IReadOnlyList<(string Name, double Value)> Breakdown =>
        LastSummary?.Tasks.Select(t => (t.Name, 100 * t.Acc)).ToList() ?? new List<(string, double)>();

    /// <summary>The head on the scored positions of one micro-batch: each request's summed log-probability and whether every token is the argmax.</summary>
    void Score(IPrunableModel model, Batch b, Tensor hidden)
    {
        using var scope = NewDisposeScope();
        var flat = new List<long>();
        var targets = new List<long>();
        for (int i = 0; i < b.Rows.Length; i++)
            foreach (var (start, tokens) in _tasks.Rows[b.Rows[i]].Scored)
                for (int j = 0; j < tokens.Length; j++) { flat.Add((long)i * b.Length + start + j); targets.Add(tokens[j]); }
        var h = hidden.reshape(-1, hidden.shape[2]).index_select(0, torch.tensor(flat.ToArray(), device: hidden.device));
        var lp = new double[flat.Count];
        var hit = new bool[flat.Count];
        long vocab = Language(model).VocabSize;
        for (int at = 0; at < flat.Count;)
        {
            using var chunk = NewDisposeScope();
            int n = (int)Math.Clamp(HeadElements / vocab, 1, flat.Count - at);
            var logits = model.Head(h.narrow(0, at, n).unsqueeze(0)).squeeze(0);
            // Softmax in float32 at least, whatever the weights' dtype; float64 stays float64.
            if (logits.dtype != ScalarType.Float64) logits = logits.to(ScalarType.Float32);
            var target = torch.tensor(targets.GetRange(at, n).ToArray(), device: logits.device);
            var picked = logits.log_softmax(1).gather(1, target.unsqueeze(1)).squeeze(1).to(ScalarType.Float64).cpu();
            var greedy = logits.argmax(1).eq(target).cpu();
            Array.Copy(picked.data<double>().ToArray(), 0, lp, at, n);
            Array.Copy(greedy.data<bool>().ToArray(), 0, hit, at, n);
            at += n;
        }
        int p = 0;
        foreach (var r in b.Rows)
        {
            var scored = _tasks.Rows[r].Scored;
            for (int k = 0; k < scored.Length; k++)
            {
                double sum = 0;
                bool all = true;
                for (int j = 0; j < scored[k].Targets.Length; j++, p++) { sum += lp[p]; all &= hit[p]; }
                Results.LogLikelihood[r][k] = sum;
                Results.Greedy[r][k] = all;
            }
        }
    }

    public void Dispose()
    {
        foreach (var b in _batches) b.Dispose();
        _batches.Clear();
    }
}
