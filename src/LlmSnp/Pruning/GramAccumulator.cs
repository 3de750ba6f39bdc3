using static TorchSharp.torch;

namespace LlmSnp.Pruning;

/// <summary>
/// Accumulates the augmented Gram matrix G = (1/T) Σ x xᵀ with x = [1; a] (snp.md §2): chunks are
/// multiplied in float32 (float64 when activations are float64) and summed into float64 on the device.
/// Rows may carry weights w (an expert's output enters its block scaled by its routing weight): then
/// G = Σ w² x xᵀ / Σ w², the Gram of the least squares that weighs each row as the block's output does.
/// </summary>
public sealed class GramAccumulator : IDisposable
{
    const int ChunkRows = 8192;
    // The augmented matrix itself accumulates (Σ x xᵀ in the unit block, Σ x in row 0), so the
    // result needs no second n² buffer: for an 8192-wide MLP that is 0.5 GB less at the peak.
    Tensor? _g;
    readonly Tensor _xtx, _sum;
    /// <summary>Rows added (tokens that reached the layer).</summary>
    public long Count { get; private set; }
    /// <summary>Σ w² over the rows added (the row count when unweighted): G's normaliser.</summary>
    public double Mass { get; private set; }
    public int Units { get; }

    public GramAccumulator(int units, Device device)
    {
        Units = units;
        _g = torch.zeros(units + 1, units + 1, ScalarType.Float64, device);
        using (NewDisposeScope())
        {
            _xtx = _g.narrow(0, 1, units).narrow(1, 1, units).DetachFromDisposeScope();
            _sum = _g[0].narrow(0, 1, units).DetachFromDisposeScope();
        }
        int nb = units > 2 * BlockUnits ? BlockUnits : units;
        _blocks = Enumerable.Range(0, (units + nb - 1) / nb).Select(i => (Start: (long)i * nb, Length: (long)Math.Min(nb, units - i * nb))).ToArray();
    }

    // Wide layers accumulate only the lower block triangle of xᵀx (mirrored once in Result):
    // 16 blocks of an 8192-wide MLP cost 136/256 of the full product.
    const int BlockUnits = 512;
    readonly (long Start, long Length)[] _blocks;

    /// <summary>Adds activations [tokens, units], each row weighted by <paramref name="rowWeights"/> [tokens] where given.</summary>
    public void Add(Tensor a, Tensor? rowWeights = null)
    {
        if (_g is null) throw new InvalidOperationException("GramAccumulator: Result was already taken");
        using var scope = NewDisposeScope();
        var mm = a.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        long rows = a.shape[0];
        for (long r = 0; r < rows; r += ChunkRows)
        {
            using var chunk = NewDisposeScope();
            long n = Math.Min(ChunkRows, rows - r);
            var x = a.narrow(0, r, n).to(mm);
            Tensor? w = null;
            if (rowWeights is not null)
            {
                // Σ w² a aᵀ = Σ (w a)(w a)ᵀ: the products run on the scaled rows; the constant row sums w·(w a).
                w = rowWeights.narrow(0, r, n).to(mm).unsqueeze(1);
                x = x * w;
            }
            for (int i = 0; i < _blocks.Length; i++)
            {
                var xi = x.narrow(1, _blocks[i].Start, _blocks[i].Length);
                for (int j = 0; j <= i; j++)
                {
                    var xj = x.narrow(1, _blocks[j].Start, _blocks[j].Length);
                    var target = _xtx.narrow(0, _blocks[i].Start, _blocks[i].Length).narrow(1, _blocks[j].Start, _blocks[j].Length);
                    // F32 products of at most 8192 rows, summed in F64 (promoted in place, no F64 temporary).
                    if (mm == ScalarType.Float64) target.addmm_(xi.t(), xj);
                    else target.add_(xi.t().mm(xj));
                }
            }
            if (w is null)
            {
                _sum.add_(x.sum(0, type: ScalarType.Float64));
                Mass += n;
            }
            else
            {
                _sum.add_((x * w).sum(0, type: ScalarType.Float64));
                Mass += w.to(ScalarType.Float64).square().sum().item<double>();
            }
        }
        Count += rows;
    }

    /// <summary>The (units+1)² augmented Gram in float64 (the caller owns it); the constant unit is index 0.</summary>
    public Tensor Result(string layer)
    {
        if (Count == 0) throw new LlmSnpException($"{layer}: no calibration tokens reached this layer");
        var g = _g ?? throw new InvalidOperationException("GramAccumulator: Result was already taken");
        using (NewDisposeScope())
        {
            // Exactly symmetric: mirror the lower triangle (BLAS rounds (i, j) and (j, i) differently).
            for (int i = 0; i < _blocks.Length; i++)
            {
                var d = _xtx.narrow(0, _blocks[i].Start, _blocks[i].Length).narrow(1, _blocks[i].Start, _blocks[i].Length);
                d.copy_(d.tril() + d.tril(-1).t());
                for (int j = 0; j < i; j++)
                    _xtx.narrow(0, _blocks[j].Start, _blocks[j].Length).narrow(1, _blocks[i].Start, _blocks[i].Length)
                        .copy_(_xtx.narrow(0, _blocks[i].Start, _blocks[i].Length).narrow(1, _blocks[j].Start, _blocks[j].Length).t());
            }
            if (!(Mass > 0)) throw new LlmSnpException($"{layer}: the calibration tokens that reached this layer carry no weight");
            g.div_(Mass);
            g[0, 0] = 1.0;
            g.narrow(1, 0, 1).copy_(g.narrow(0, 0, 1).t());
            if (!Subspace.AllFinite(g))
            {
                Dispose();
                throw new LlmSnpException($"{layer}: non-finite values in the calibration activations (NaN or Inf); the model or its inputs are broken");
            }
        }
        _g = null;
        _xtx.Dispose();
        _sum.Dispose();
        return g;
    }

    public void Dispose()
    {
        _xtx.Dispose();
        _sum.Dispose();
        _g?.Dispose();
        _g = null;
    }
}
