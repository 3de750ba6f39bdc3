using System.Diagnostics;
using LlmSnp.Models;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Pruning.Depth;

/// <summary>
/// The depth pass (docs/depth.md), before any width pruning, streamed one block at a time over the calibration set:
/// first the criterion's score of every candidate (on the dense model), then, removed spans chosen, each span's
/// replacement fitted in order on the stream of the model as already shortened (so a later span's fit sees the
/// earlier folds). Resident besides one block: the calibration stream at the last n+1 block boundaries (n the span
/// length) and float64 Gram matrices over the hidden size.
/// </summary>
public static class DepthScan
{
    public static DepthPlan Plan(IPrunableModel model, IReadOnlyList<Tensor> calibration, DepthOptions o, Action<string>? log)
    {
        o.CheckAgainst(model.BlockCount);
        var sw = Stopwatch.StartNew();
        int blocks = model.BlockCount;
        bool lstsq = o.Replace == DepthReplace.Lstsq;
        // Block 0 has no preceding MLP to hold a replacement.
        string? excluded = lstsq && o.Named is null ? "block 0: no preceding block whose MLP could hold the least-squares replacement" : null;
        var scores = new List<SpanScore>();
        IReadOnlyList<int> removed;
        if (o.Named is { } named)
        {
            removed = named;
            if (o.CriterionGiven) scores = Scores(model, calibration, o, SpanLength(o), log);
        }
        else
        {
            int n = SpanLength(o);
            scores = Scores(model, calibration, o, n, log);
            var eligible = scores.Where(s => !(lstsq && s.Start == 0)).ToList();
            if (o.Criterion == DepthCriterion.Influence)
            {
                if (eligible.Count < o.Count) throw new LlmSnpException($"--drop-blocks {o.Count}: only {eligible.Count} blocks can be removed with --depth-replace lstsq (block 0 has no preceding block)");
                removed = eligible.OrderBy(s => s.Score).ThenBy(s => s.Start).Take(o.Count).Select(s => s.Start).OrderBy(i => i).ToArray();
            }
            else
            {
                if (eligible.Count == 0) throw new LlmSnpException($"--drop-blocks {o.Count}: no span of {o.Count} consecutive blocks after block 0 can be replaced (the model has {blocks} blocks)");
                var best = eligible.OrderBy(s => s.Score).ThenBy(s => s.Start).First();
                removed = Enumerable.Range(best.Start, best.Length).ToArray();
            }
        }
        log?.Invoke($"depth: removing blocks {string.Join(", ", removed)} of {blocks} ({(o.Named is null ? $"criterion {DepthOptions.Name(o.Criterion)}" : "named")}, replacement {DepthOptions.Name(o.Replace)})");
        var (spans, addsBias) = Fit(model, calibration, o, removed, log);
        return new DepthPlan
        {
            Options = o, OriginalBlocks = blocks, Removed = removed, Scores = scores, Spans = spans, Excluded = excluded,
            AddsConsumerBias = addsBias, Seconds = sw.Elapsed.TotalSeconds,
        };
    }

    static int SpanLength(DepthOptions o) => o.Criterion == DepthCriterion.Influence ? 1 : o.Removed;

    /// <summary>
    /// Scores every candidate on the dense model: per block (influence) or per span of <paramref name="n"/> consecutive
    /// blocks (angular, lstsq), lower meaning more removable.
    /// </summary>
    static List<SpanScore> Scores(IPrunableModel model, IReadOnlyList<Tensor> calibration, DepthOptions o, int n, Action<string>? log)
    {
        int blocks = model.BlockCount;
        var scores = new List<SpanScore>();
        // states[k]: the stream at boundary (current − k); mlpOut[k]: the MLP output of the block ending there.
        var states = new List<List<Tensor>> { calibration.Select(model.Embed).ToList() };
        var mlpOut = new List<List<Tensor>?> { null };
        try
        {
            for (int b = 0; b < blocks; b++)
            {
                List<Tensor> next;
                List<Tensor>? x = null;
                using (var block = model.LoadBlock(b))
                {
                    if (o.Criterion == DepthCriterion.Lstsq)
                    {
                        CheckFoldable(block, b);
                        x = new List<Tensor>();
                        next = new List<Tensor>();
                        foreach (var h in states[0])
                        {
                            var r = RunWithMlpOutput(block, h, b);
                            next.Add(r.Output); x.Add(r.MlpOutput); r.MlpInput.Dispose();
                        }
                    }
                    else next = states[0].Select(h => block.Forward(h)!).ToList();
                }
                states.Insert(0, next);
                mlpOut.Insert(0, x);
                int start = b + 1 - n;   // the span [start, b + 1) ends here
                if (start >= 0)
                {
                    var input = states[n];
                    double score = o.Criterion switch
                    {
                        DepthCriterion.Influence => 1 - MeanCosine(input, next, angular: false),
                        DepthCriterion.Angular => MeanCosine(input, next, angular: true),
                        _ => start == 0 ? double.NaN : FitSpan(mlpOut[n]!, input, next, o.Damp, intercept: true, $"blocks {start}..{b}").RelativeError,
                    };
                    if (!double.IsNaN(score)) scores.Add(new SpanScore(start, n, score));
                }
                // Keep what the next spans need: n + 1 boundaries (and the MLP output of the block before each span).
                while (states.Count > n + 1) { states[^1].ForEach(t => t.Dispose()); states.RemoveAt(states.Count - 1); }
                while (mlpOut.Count > n + 1) { mlpOut[^1]?.ForEach(t => t.Dispose()); mlpOut.RemoveAt(mlpOut.Count - 1); }
                log?.Invoke($"depth scores: block {b + 1}/{blocks}");
            }
        }
        finally
        {
            foreach (var s in states) s.ForEach(t => t.Dispose());
            foreach (var s in mlpOut) s?.ForEach(t => t.Dispose());
        }
        return scores;
    }

    /// <summary>Mean over calibration tokens of cos(a, b), or of arccos(cos)/π.</summary>
    static double MeanCosine(List<Tensor> a, List<Tensor> b, bool angular)
    {
        double sum = 0; long count = 0;
        for (int k = 0; k < a.Count; k++)
        {
            using var scope = NewDisposeScope();
            var cos = F.cosine_similarity(a[k].to(ScalarType.Float64), b[k].to(ScalarType.Float64), dim: -1, eps: 1e-12).clamp(-1, 1);
            var v = angular ? cos.arccos() / Math.PI : cos;
            sum += v.sum().item<double>();
            count += v.numel();
        }
        return sum / count;
    }

    /// <summary>The node layer whose consumer writes the block's MLP output (alone in the last sub-block), or a refusal.</summary>
    internal static int MlpLayer(IPrunableBlock block, int index)
    {
        var last = block.SubBlocks[^1];
        if (last.Length != 1 || block.NodeLayers[last[0]].Kind != NodeKind.Mlp)
            throw new LlmSnpException($"block {index}: its last sub-block is not one dense MLP (a mixture of experts); --depth-replace lstsq folds into a dense MLP's down_proj only; use --depth-replace none");
        return last[0];
    }

    static void CheckFoldable(IPrunableBlock block, int index) => MlpLayer(block, index);

    internal sealed record MlpRun(Tensor Output, Tensor MlpInput, Tensor MlpOutput);

    /// <summary>
    /// The block on <paramref name="h"/>, sub-block by sub-block, with the stream entering its MLP sub-block (u) and the
    /// MLP consumer's output x = W a + b. The replacement folds into that consumer only where the block's output is
    /// exactly u + x (no norm after the MLP, as in post-LayerNorm OPT or Gemma): checked here on the data itself.
    /// </summary>
    internal static MlpRun RunWithMlpOutput(IPrunableBlock block, Tensor h, int index)
    {
        int j = MlpLayer(block, index);
        using var scope = NewDisposeScope();
        var subs = block.SubBlocks;
        var cur = h;
        for (int s = 0; s < subs.Count - 1; s++) cur = block.Advance(s, cur);
        var a = block.Activations(j, cur);
        var (w, c) = block.Consumer(j);
        var x = F.linear(a, w, c);
        var output = block.Residual(j, cur, a);
        double scale = output.abs().max().to(ScalarType.Float64).item<double>();
        double diff = (output - cur - x).abs().max().to(ScalarType.Float64).item<double>();
        if (diff > 1e-4 * Math.Max(scale, 1e-30) + 1e-6)
            throw new LlmSnpException($"block {index}: the MLP's output does not enter the residual stream unchanged (a norm follows it: post-LayerNorm or a post-feedforward norm), so a linear map folded into its down_proj cannot replace removed blocks exactly; use --depth-replace none");
        if (ReferenceEquals(cur, h)) cur = h.alias();
        return new MlpRun(output.MoveToOuterDisposeScope(), cur.MoveToOuterDisposeScope(), x.MoveToOuterDisposeScope());
    }

    internal sealed record SpanFit(Tensor M, Tensor? T, double RelativeError, double DropRelativeError, Damping Damping);

    /// <summary>
    /// Least squares of what a span added, Δ = h_end − h_start, on the preceding block's MLP output x (and a constant
    /// where <paramref name="intercept"/>): min ‖x·M + t − Δ‖² + λ‖M‖², λ from SNP's damping of the Gram over x
    /// (the constant undamped), all in float64. M → 0 is plain dropping, so damping shrinks toward it. Errors are
    /// relative to the variance of the stream leaving the span, Σ‖h_end − mean‖².
    /// </summary>
    internal static SpanFit FitSpan(List<Tensor> mlpOut, List<Tensor> start, List<Tensor> end, double damp, bool intercept, string what)
    {
        using var scope = NewDisposeScope();
        long d = start[0].shape[^1];
        int off = intercept ? 1 : 0;
        var g = torch.zeros(d + off, d + off, ScalarType.Float64);
        var c = torch.zeros(d + off, d, ScalarType.Float64);
        var sumEnd = torch.zeros(d, ScalarType.Float64);
        double dd = 0, ee = 0; long rows = 0;
        for (int k = 0; k < start.Count; k++)
        {
            using var inner = NewDisposeScope();
            var x = mlpOut[k].reshape(-1, d).to(ScalarType.Float64).cpu();
            var e = end[k].reshape(-1, d).to(ScalarType.Float64).cpu();
            var delta = e - start[k].reshape(-1, d).to(ScalarType.Float64).cpu();
            var a = intercept ? torch.cat(new[] { torch.ones(x.shape[0], 1, ScalarType.Float64), x }, 1) : x;
            g.add_(a.T.matmul(a));
            c.add_(a.T.matmul(delta));
            dd += delta.square().sum().item<double>();
            ee += e.square().sum().item<double>();
            sumEnd.add_(e.sum(new long[] { 0 }));
            rows += x.shape[0];
        }
        double variance = ee - sumEnd.square().sum().item<double>() / rows;
        var gd = g.clone();
        var (l, damping) = Subspace.DampedCholesky(gd, damp, what, overwrite: true, constantFirst: intercept);
        var b = torch.cholesky_solve(c, l);
        // Residual from the statistics: ‖Δ‖² − 2⟨B, C⟩ + ⟨B, G B⟩ with the undamped G.
        double err = dd - 2 * (b * c).sum().item<double>() + (b * g.matmul(b)).sum().item<double>();
        err = Math.Max(err, 0);
        var m = (intercept ? b.narrow(0, 1, d) : b).contiguous().MoveToOuterDisposeScope();
        var t = intercept ? b[0].contiguous().MoveToOuterDisposeScope() : null;
        return new SpanFit(m, t, err / variance, dd / variance, damping);
    }

    /// <summary>
    /// The removed spans in order, on the stream of the model as already shortened: for each, the preceding block's MLP
    /// output x and the span's input, the span run on it, and (lstsq) its replacement fitted and applied to the stream.
    /// </summary>
    static (List<SpanFold> Spans, bool AddsBias) Fit(IPrunableModel model, IReadOnlyList<Tensor> calibration, DepthOptions o, IReadOnlyList<int> removed, Action<string>? log)
    {
        var runs = DepthPlan.Runs(removed);
        var folds = new List<SpanFold>();
        bool addsBias = false;
        var hidden = calibration.Select(model.Embed).ToList();
        try
        {
            int b = 0;
            while (b < model.BlockCount)
            {
                var run = runs.FirstOrDefault(r => r.Start == b + 1);
                bool precedes = runs.Any(r => r.Start == b + 1);
                if (!precedes && runs.Any(r => r.Start == 0 && b == 0))
                {
                    // A span from block 0: nothing precedes it; its error as dropped, measured from the embeddings.
                    run = runs.First(r => r.Start == 0);
                    var start0 = hidden.Select(h => h.alias()).ToList();
                    RunSpan(model, hidden, run.Start, run.End);
                    double drop0 = DropError(start0, hidden);
                    folds.Add(new SpanFold(run.Start, run.End, -1, torch.zeros(0), null, drop0, drop0, 0, 0));
                    start0.ForEach(t => t.Dispose());
                    b = run.End;
                    continue;
                }
                using var block = model.LoadBlock(b);
                if (!precedes)
                {
                    block.Advance(hidden);
                    b++;
                    continue;
                }
                // Block b precedes the span [run.Start, run.End): x and the span's input from it.
                var mlpOut = new List<Tensor>();
                bool intercept = false;
                if (o.Replace == DepthReplace.Lstsq)
                {
                    int j = MlpLayer(block, b);
                    bool hasBias = block.Consumer(j).Bias is not null;
                    intercept = hasBias || block.CanAddConsumerBias(j, out _);
                    addsBias |= intercept && !hasBias;
                    for (int k = 0; k < hidden.Count; k++)
                    {
                        var r = RunWithMlpOutput(block, hidden[k], b);
                        hidden[k].Dispose();
                        hidden[k] = r.Output;
                        mlpOut.Add(r.MlpOutput);
                        r.MlpInput.Dispose();
                    }
                }
                else block.Advance(hidden);
                var start = hidden.Select(h => h.alias()).ToList();
                var end = hidden.Select(h => h.alias()).ToList();
                RunSpan(model, end, run.Start, run.End);
                string what = $"blocks {run.Start}..{run.End - 1}";
                if (o.Replace == DepthReplace.Lstsq)
                {
                    var fit = FitSpan(mlpOut, start, end, o.Damp, intercept, what);
                    folds.Add(new SpanFold(run.Start, run.End, b, fit.M, fit.T, fit.RelativeError, fit.DropRelativeError, fit.Damping.Lambda, fit.Damping.Escalations));
                    // The stream goes on from the replaced span: h + x·M + t.
                    for (int k = 0; k < hidden.Count; k++)
                    {
                        using var scope = NewDisposeScope();
                        var x = mlpOut[k].to(ScalarType.Float64).cpu();
                        var add = x.matmul(fit.M);
                        if (fit.T is not null) add = add + fit.T;
                        var next = (hidden[k] + add.to(hidden[k].dtype, hidden[k].device)).MoveToOuterDisposeScope();
                        hidden[k].Dispose();
                        hidden[k] = next;
                    }
                    log?.Invoke($"depth: {what} replaced, relative error {fit.RelativeError:G4} (dropped: {fit.DropRelativeError:G4})");
                }
                else
                {
                    double drop = DropError(start, end);
                    folds.Add(new SpanFold(run.Start, run.End, b, torch.zeros(0), null, drop, drop, 0, 0));
                    log?.Invoke($"depth: {what} dropped, relative error {drop:G4}");
                }
                mlpOut.ForEach(t => t.Dispose());
                start.ForEach(t => t.Dispose());
                end.ForEach(t => t.Dispose());
                b = run.End;
            }
        }
        finally { hidden.ForEach(h => h.Dispose()); }
        return (folds, addsBias);
    }

    /// <summary>‖h_end − h_start‖² over the variance of h_end: the error of dropping a span.</summary>
    static double DropError(List<Tensor> start, List<Tensor> end)
    {
        double dd = 0, ee = 0; long rows = 0;
        long d = end[0].shape[^1];
        using var sum = torch.zeros(d, ScalarType.Float64);
        for (int k = 0; k < start.Count; k++)
        {
            using var scope = NewDisposeScope();
            var e = end[k].reshape(-1, d).to(ScalarType.Float64).cpu();
            dd += (e - start[k].reshape(-1, d).to(ScalarType.Float64).cpu()).square().sum().item<double>();
            ee += e.square().sum().item<double>();
            sum.add_(e.sum(new long[] { 0 }));
            rows += e.shape[0];
        }
        using var sq = sum.square().sum();
        double variance = ee - sq.item<double>() / rows;
        return dd / variance;
    }

    /// <summary>Runs blocks [from, to) over the stream in place, one block resident at a time.</summary>
    static void RunSpan(IPrunableModel model, List<Tensor> hidden, int from, int to)
    {
        for (int i = from; i < to; i++)
        {
            using var block = model.LoadBlock(i);
            block.Advance(hidden);
        }
    }
}
