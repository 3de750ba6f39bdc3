using System.Diagnostics;
using LlmSnp.Models;
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

    public static PerplexityResult Evaluate(OptModel model, IReadOnlyList<int> ids, int seqLen, int? maxWindows, string dataset, Action<string>? log = null)
    {
        if (seqLen < 2) throw new LlmSnpException($"--seqlen must be at least 2 (got {seqLen})");
        if (seqLen > model.Config.MaxPositions)
            throw new LlmSnpException($"--seqlen {seqLen} exceeds the model's max_position_embeddings ({model.Config.MaxPositions})");
        int windows = ids.Count / seqLen;
        if (maxWindows is int mw) windows = Math.Min(windows, mw);
        if (windows == 0) throw new LlmSnpException($"{dataset}: {ids.Count} tokens is less than one window of {seqLen}");
        var sw = Stopwatch.StartNew();
        int micro = Math.Clamp(4096 / seqLen, 1, windows);   // enough rows per GEMM to keep the cores busy
        int perGroup = (int)Math.Clamp(GroupHiddenBytes / ((long)seqLen * model.Config.Hidden * 4), micro, windows);
        var nll = new double[windows];
        for (int g0 = 0; g0 < windows; g0 += perGroup)
        {
            int g1 = Math.Min(windows, g0 + perGroup);
            var batches = new List<(int Start, Tensor Ids, Tensor Hidden)>();
            for (int w = g0; w < g1; w += micro)
            {
                int n = Math.Min(micro, g1 - w);
                var chunk = new long[n * seqLen];
                for (int i = 0; i < chunk.Length; i++) chunk[i] = ids[w * seqLen + i];
                var t = torch.tensor(chunk, new long[] { n, seqLen }).to(model.Device);
                batches.Add((w, t, model.Embed(t)));
            }
            for (int b = 0; b < model.BlockCount; b++)
            {
                using var block = model.LoadBlock(b);
                for (int k = 0; k < batches.Count; k++)
                {
                    var next = block.Forward(batches[k].Hidden)!;
                    batches[k].Hidden.Dispose();
                    batches[k] = batches[k] with { Hidden = next };
                }
                log?.Invoke($"windows {g0 + 1}-{g1}/{windows}: block {b + 1}/{model.BlockCount}, {sw.Elapsed.TotalSeconds:F1}s");
            }
            foreach (var (start, t, h) in batches)
            {
                for (int j = 0; j < t.shape[0]; j++)
                {
                    using var scope = NewDisposeScope();
                    var logits = model.Head(h[j].unsqueeze(0)).squeeze(0).to(ScalarType.Float32);   // softmax in F32 whatever the weights
                    var loss = F.cross_entropy(logits.narrow(0, 0, seqLen - 1), t[j].narrow(0, 1, seqLen - 1));
                    nll[start + j] = loss.to(ScalarType.Float64).item<double>();
                }
                t.Dispose(); h.Dispose();
            }
        }
        double mean = nll.Average();
        if (!double.IsFinite(mean)) throw new LlmSnpException($"{dataset}: perplexity is not finite (model produced non-finite logits)");
        return new PerplexityResult(dataset, Math.Exp(mean), windows, (long)windows * seqLen, seqLen, sw.Elapsed.TotalSeconds, nll[0]);
    }
}
