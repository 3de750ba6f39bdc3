using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Generation;

/// <summary>
/// A language model with every block resident, each with its own KV cache: feeding tokens continues one sequence.
/// Pruning streams one block at a time; generation cannot (every token passes every block), so this holds them all.
/// </summary>
public sealed class CachedDecoder : IDisposable
{
    readonly ILanguageModel _model;
    readonly List<ICachedBlock> _blocks = new();
    readonly KvCache[] _caches;
    /// <summary>The ids fed so far, kept only for a model whose cache can go stale (<see cref="ILanguageModel.RecomputeCachePast"/>).</summary>
    readonly List<Tensor>? _fed;

    /// <summary>Positions the caches hold at most (≤ the model's max positions).</summary>
    public int Capacity { get; }
    /// <summary>Tokens fed so far: the position of the next one.</summary>
    public int Position { get; private set; }
    public ILanguageModel Model => _model;

    public CachedDecoder(ILanguageModel model, int capacity)
    {
        if (capacity < 1 || capacity > model.MaxPositions)
            throw new LlmSnpException($"a sequence of {capacity} positions does not fit the model's max_position_embeddings ({model.MaxPositions})");
        _model = model;
        Capacity = capacity;
        _caches = Enumerable.Range(0, model.BlockCount).Select(_ => new KvCache(capacity)).ToArray();
        if (model.RecomputeCachePast is not null) _fed = new List<Tensor>();
        try
        {
            for (int i = 0; i < model.BlockCount; i++) _blocks.Add(model.LoadCachedBlock(i));
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>
    /// Feeds ids [batch, t] at positions Position..Position+t-1 and returns their logits [batch, t, vocab],
    /// or with <paramref name="allLogits"/> false only the last position's [batch, 1, vocab] (all that sampling needs).
    /// </summary>
    public Tensor Forward(Tensor ids, bool allLogits = false)
    {
        int t = (int)ids.shape[1];
        if (t < 1) throw new ArgumentException("no tokens to feed", nameof(ids));
        if (Position + t > Capacity)
            throw new LlmSnpException($"sequence of {Position + t} tokens exceeds the {Capacity} positions this decoder holds");
        using var scope = NewDisposeScope();
        var input = ids;
        int start = Position;
        if (_model.RecomputeCachePast is int past && start > 0 && start <= past && start + t > past)
        {
            // The sequence grows past the point where its RoPE tables switch: every cached position is recomputed
            // with the new tables, from position 0 (what the full forward of the whole sequence computes).
            input = torch.cat(_fed!.Append(ids.to(_fed![0].device)).ToArray(), 1);
            foreach (var c in _caches) c.Clear();
            start = 0;
        }
        var h = _model.EmbedAt(input, start);
        for (int i = 0; i < _blocks.Count; i++) h = _blocks[i].Step(h, _caches[i], start);
        if (input.shape[1] > t) h = h.narrow(1, input.shape[1] - t, t);   // only the new tokens' outputs
        if (!allLogits && t > 1) h = h.narrow(1, t - 1, 1);
        var logits = _model.Head(h);
        _fed?.Add(ids.clone().DetachFromDisposeScope());
        Position += t;
        return logits.MoveToOuterDisposeScope();
    }

    /// <summary>Starts a new sequence (the cache buffers are reused).</summary>
    public void Reset()
    {
        foreach (var c in _caches) c.Clear();
        ForgetFed();
        Position = 0;
    }

    void ForgetFed()
    {
        if (_fed is null) return;
        foreach (var f in _fed) f.Dispose();
        _fed.Clear();
    }

    public void Dispose()
    {
        foreach (var b in _blocks) b.Dispose();
        _blocks.Clear();
        foreach (var c in _caches) c.Dispose();
        ForgetFed();
    }
}
