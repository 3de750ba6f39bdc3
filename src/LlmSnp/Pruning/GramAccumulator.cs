using static TorchSharp.torch;

namespace LlmSnp.Pruning;

/// <summary>
/// Accumulates the augmented Gram matrix G = (1/T) Σ x xᵀ with x = [1; a] (snp.md §2): chunks are
/// multiplied in float32 (float64 when activations are float64) and summed into float64 on the device.
/// </summary>
public sealed class GramAccumulator : IDisposable
{
    const int ChunkRows = 8192;
    readonly Tensor _xtx, _sum;
    public long Count { get; private set; }
    public int Units { get; }

    public GramAccumulator(int units, Device device)
    {
        Units = units;
        _xtx = torch.zeros(units, units, ScalarType.Float64, device);
        _sum = torch.zeros(units, ScalarType.Float64, device);
    }

    /// <summary>Adds activations [tokens, units].</summary>
    public void Add(Tensor a)
    {
        using var scope = NewDisposeScope();
        var mm = a.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        long rows = a.shape[0];
        for (long r = 0; r < rows; r += ChunkRows)
        {
            var x = a.narrow(0, r, Math.Min(ChunkRows, rows - r)).to(mm);
            _xtx.add_(x.t().mm(x).to(ScalarType.Float64));
            _sum.add_(x.sum(0, type: ScalarType.Float64));
        }
        Count += rows;
    }

    /// <summary>The (units+1)² augmented Gram in float64; the constant unit is index 0.</summary>
    public Tensor Result(string layer)
    {
        if (Count == 0) throw new LlmSnpException($"{layer}: no calibration tokens reached this layer");
        using var scope = NewDisposeScope();
        int n = Units;
        var g = torch.zeros(n + 1, n + 1, ScalarType.Float64, _xtx.device);
        g[0, 0] = 1.0;
        var mu = _sum / Count;
        g[0, TensorIndex.Slice(1)] = mu;
        g[TensorIndex.Slice(1), 0] = mu;
        g[TensorIndex.Slice(1), TensorIndex.Slice(1)] = _xtx / Count;
        if (!torch.isfinite(g).all().item<bool>())
            throw new LlmSnpException($"{layer}: non-finite values in the calibration activations (NaN or Inf); the model or its inputs are broken");
        return g.MoveToOuterDisposeScope();
    }

    public void Dispose()
    {
        _xtx.Dispose();
        _sum.Dispose();
    }
}
