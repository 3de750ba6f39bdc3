using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>
/// One block's attention keys and values for the positions seen so far ([batch, kv_heads, positions, head_dim]),
/// for generation. Allocated once at its capacity on the first append, so a decode step copies one position in
/// instead of concatenating the whole history. K/V are stored before any grouped-query repeat: a pruned block
/// with fewer K/V heads has a smaller cache.
/// </summary>
public sealed class KvCache : IDisposable
{
    Tensor? _k, _v;
    public int Capacity { get; }
    /// <summary>Positions held: the position the next token takes.</summary>
    public int Length { get; private set; }

    public KvCache(int capacity)
    {
        if (capacity < 1) throw new ArgumentOutOfRangeException(nameof(capacity), capacity, "a KV cache needs room for one position");
        Capacity = capacity;
    }

    /// <summary>Appends k, v [b, kv_heads, t, d] and returns the whole history [b, kv_heads, Length, d] (views of the cache).</summary>
    public (Tensor K, Tensor V) Append(Tensor k, Tensor v)
    {
        int t = (int)k.shape[2];
        if (Length + t > Capacity) throw new LlmSnpException($"KV cache full: {Length} + {t} positions exceed its capacity of {Capacity}");
        if (_k is null)
        {
            _k = torch.empty(new[] { k.shape[0], k.shape[1], Capacity, k.shape[3] }, k.dtype, k.device).DetachFromDisposeScope();
            _v = torch.empty(new[] { v.shape[0], v.shape[1], Capacity, v.shape[3] }, v.dtype, v.device).DetachFromDisposeScope();
        }
        using (var scope = NewDisposeScope())
        {
            _k.narrow(2, Length, t).copy_(k);
            _v!.narrow(2, Length, t).copy_(v);
        }
        Length += t;
        return (_k.narrow(2, 0, Length), _v!.narrow(2, 0, Length));
    }

    /// <summary>Forgets every position (the buffers are kept for the next sequence).</summary>
    public void Clear() => Length = 0;

    public void Dispose()
    {
        _k?.Dispose();
        _v?.Dispose();
        _k = _v = null;
    }
}
