using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Evaluation;

/// <summary>
/// A metric measured by streaming evaluation inputs through the blocks alongside pruning: each
/// block, once pruned, moves the evaluation hidden states one step, so a method is evaluated in
/// the same pass that prunes it, with one block resident.
/// </summary>
public interface IStreamedMetric
{
    string Name { get; }
    bool HigherIsBetter { get; }
    /// <summary>Evaluation hidden states (micro-batches) at the input of block 0.</summary>
    List<Tensor> Embed(IPrunableModel model);
    /// <summary>Moves the hidden states through one block (the plain causal forward unless the metric packs its inputs otherwise).</summary>
    void Advance(IPrunableBlock block, List<Tensor> hidden) => block.Advance(hidden);
    /// <summary>The metric from the hidden states after the last block.</summary>
    double Finish(IPrunableModel model, List<Tensor> hidden);
    /// <summary>Parts of the last <see cref="Finish"/>'s value worth a column of their own (per task accuracy); none by default.</summary>
    IReadOnlyList<(string Name, double Value)> Breakdown => Array.Empty<(string, double)>();
}

public static class StreamedMetrics
{
    /// <summary>The metric of the model as stored (no pruning).</summary>
    public static double Dense(IPrunableModel model, IStreamedMetric metric, Action<int>? afterBlock = null)
    {
        var hidden = metric.Embed(model);
        for (int b = 0; b < model.BlockCount; b++)
        {
            var block = model.LoadBlock(b);
            try { metric.Advance(block, hidden); }
            finally
            {
                // Each block's weights become the next one's buffers; the last block's are released before the head.
                if (b < model.BlockCount - 1) block.Recycle(); else block.Dispose();
            }
            afterBlock?.Invoke(b);
        }
        return metric.Finish(model, hidden);
    }
}

/// <summary>Perplexity (models.md protocol) of fixed windows, streamed.</summary>
public sealed class PerplexityMetric : IStreamedMetric
{
    readonly long[][] _windows;
    public string Name => "perplexity";
    public bool HigherIsBetter => false;
    public int Windows => _windows.Length;

    /// <summary>Positions whose logits are formed at once.</summary>
    const long HeadChunk = 512;

    /// <summary>Mean next-token NLL of each window in the last <see cref="Finish"/>.</summary>
    public double[] LastNll { get; private set; } = Array.Empty<double>();

    /// <summary>Windows <paramref name="first"/>.. of <paramref name="seqLen"/> tokens (at most <paramref name="maxWindows"/>; the tail is dropped).</summary>
    public PerplexityMetric(IReadOnlyList<int> ids, int seqLen, int? maxWindows, int first = 0)
    {
        int n = ids.Count / seqLen - first;
        if (maxWindows is int m) n = Math.Min(n, m);
        if (n <= 0) throw new LlmSnpException($"evaluation text has fewer than {seqLen} tokens");
        _windows = Enumerable.Range(first, n).Select(w => Enumerable.Range(w * seqLen, seqLen).Select(i => (long)ids[i]).ToArray()).ToArray();
    }

    public List<Tensor> Embed(IPrunableModel model)
    {
        int seq = _windows[0].Length, micro = Math.Clamp(4096 / seq, 1, _windows.Length);
        var list = new List<Tensor>();
        for (int w = 0; w < _windows.Length; w += micro)
        {
            var chunk = _windows.Skip(w).Take(micro).ToArray();
            using var ids = torch.tensor(chunk.SelectMany(x => x).ToArray(), new long[] { chunk.Length, seq });
            list.Add(model.Embed(ids.to(model.Device)));
        }
        return list;
    }

    public double Finish(IPrunableModel model, List<Tensor> hidden)
    {
        int seq = _windows[0].Length, w = 0;
        var nll = new double[_windows.Length];
        foreach (var h in hidden)
        {
            for (int j = 0; j < h.shape[0]; j++, w++)
            {
                using var scope = NewDisposeScope();
                var target = torch.tensor(_windows[w], device: model.Device).narrow(0, 1, seq - 1);
                // Logits a chunk of positions at a time: a 2048 × 128256 window is 1 GB of logits and as much again
                // for the softmax, memory the page cache then lacks for the next window's weights.
                double sum = 0;
                for (long at = 0; at < seq - 1; at += HeadChunk)
                {
                    using var chunk = NewDisposeScope();
                    long n = Math.Min(HeadChunk, seq - 1 - at);
                    var logits = model.Head(h[j].narrow(0, at, n).unsqueeze(0)).squeeze(0).to(ScalarType.Float32);
                    // Softmax in F32 whatever the weights' dtype (the protocol); the sum over chunks in F64.
                    sum += F.cross_entropy(logits, target.narrow(0, at, n), reduction: nn.Reduction.Sum).to(ScalarType.Float64).item<double>();
                }
                nll[w] = sum / (seq - 1);
            }
            h.Dispose();
        }
        LastNll = nll;
        double mean = nll.Average();
        if (!double.IsFinite(mean)) throw FiniteLogits.Error(model.ModelDir);
        return Math.Exp(mean);
    }
}

/// <summary>Top-1 accuracy (%) of preprocessed images, streamed.</summary>
public sealed class AccuracyMetric : IStreamedMetric
{
    readonly Tensor _pixels;
    readonly long[] _labels;
    readonly int _batch;
    public string Name => "top1";
    public bool HigherIsBetter => true;
    /// <summary>Top-5 (%) of the last <see cref="Finish"/>.</summary>
    public double LastTop5 { get; private set; }

    public AccuracyMetric(Tensor pixels, long[] labels, int batch = 50)
    {
        _pixels = pixels; _labels = labels; _batch = batch;
    }

    public List<Tensor> Embed(IPrunableModel model)
    {
        var list = new List<Tensor>();
        for (long i = 0; i < _pixels.shape[0]; i += _batch)
            list.Add(model.Embed(_pixels.narrow(0, i, Math.Min(_batch, _pixels.shape[0] - i))));
        return list;
    }

    public double Finish(IPrunableModel model, List<Tensor> hidden)
    {
        long correct = 0, correct5 = 0, i = 0;
        foreach (var h in hidden)
        {
            using var scope = NewDisposeScope();
            var logits = model.Head(h);
            FiniteLogits.Require(logits, model.ModelDir);
            var (_, indices) = logits.topk(Math.Min(5, (int)logits.shape[1]), 1);
            var top = indices.cpu();
            var labels = torch.tensor(_labels.Skip((int)i).Take((int)top.shape[0]).ToArray()).unsqueeze(1);
            var hits = top.eq(labels);
            correct += hits.select(1, 0).sum().item<long>();
            correct5 += hits.any(1).sum().item<long>();
            i += top.shape[0];
            h.Dispose();
        }
        LastTop5 = 100.0 * correct5 / _labels.Length;
        return 100.0 * correct / _labels.Length;
    }
}
