using LlmSnp.Models;
using System.Diagnostics;
using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Evaluation;

public sealed record PerplexityResult(string Dataset, double Perplexity, int Windows, long Tokens, int SeqLen, double Seconds, double FirstWindowNll)
{
    public double TokensPerSecond => Tokens / Math.Max(Seconds, 1e-9);
}

/// <summary>
/// The published perplexity protocol (models.md §2): non-overlapping windows from position 0,
/// tail dropped, nll = mean cross-entropy of logits[:-1] against ids[1:], ppl = exp(mean nll).
/// Windows are streamed through the blocks in groups, so each block is read once per group.
/// </summary>
public static class Perplexity
{
    /// <summary>Hidden states kept per group of windows (bytes); bounds memory for long texts.</summary>
    public const long GroupHiddenBytes = 1L << 30;

    /// <summary>The width of the residual stream, from one embedded token.</summary>
    static long HiddenWidth(ILanguageModel model)
    {
        using var one = torch.zeros(1, 1, ScalarType.Int64);
        using var h = model.Embed(one.to(model.Device));
        return h.shape[^1];
    }

    public static PerplexityResult Evaluate(ILanguageModel model, IReadOnlyList<int> ids, int seqLen, int? maxWindows, string dataset, Action<string>? log = null)
    {
        if (seqLen < 2) throw new LlmSnpException($"--seqlen must be at least 2 (got {seqLen})");
        if (seqLen > model.MaxPositions)
            throw new LlmSnpException($"--seqlen {seqLen} exceeds the model's max_position_embeddings ({model.MaxPositions})");
        int windows = ids.Count / seqLen;
        if (maxWindows is int mw) windows = Math.Min(windows, mw);
        if (windows == 0) throw new LlmSnpException($"{dataset}: {ids.Count} tokens is less than one window of {seqLen}");
        var sw = Stopwatch.StartNew();
        // Groups of windows bound the hidden states held at once; each block is read once per group.
        int perGroup = (int)Math.Clamp(GroupHiddenBytes / ((long)seqLen * HiddenWidth(model) * 4), 1, windows);
        var nll = new List<double>(windows);
        for (int g0 = 0; g0 < windows; g0 += perGroup)
        {
            int n = Math.Min(perGroup, windows - g0);
            var metric = new PerplexityMetric(ids, seqLen, n, first: g0);
            StreamedMetrics.Dense(model, metric, b => log?.Invoke($"windows {g0 + 1}-{g0 + n}/{windows}: block {b + 1}/{model.BlockCount}, {sw.Elapsed.TotalSeconds:F1}s"));
            nll.AddRange(metric.LastNll);
        }
        double mean = nll.Average();
        return new PerplexityResult(dataset, Math.Exp(mean), windows, (long)windows * seqLen, seqLen, sw.Elapsed.TotalSeconds, nll[0]);
    }
}
