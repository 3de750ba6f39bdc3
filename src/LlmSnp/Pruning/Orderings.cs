using static TorchSharp.torch;

namespace LlmSnp.Pruning;

public enum Ordering { Zca, ZcaPrecision, Id, Obs, Variance, WeightNorm, Fluctuation, WandaSp, Magnitude, Random }

/// <summary>What an ordering may look at for one node layer.</summary>
public sealed record OrderingInput(Tensor Gram, Tensor ConsumerWeight, Tensor ConsumerBias, Tensor ProducerSquaredNorms, int GroupSize, long Tokens, double Damp, int Seed, string Layer);

/// <summary>
/// Unit orderings of snp.md §3, most important group first (pruning keeps a prefix). Every
/// ordering works on groups: a head is a group of d units, an MLP neuron a group of one.
/// </summary>
public static class Orderings
{
    public static readonly IReadOnlyDictionary<string, Ordering> Names = new Dictionary<string, Ordering>
    {
        ["zca"] = Ordering.Zca, ["zca-precision"] = Ordering.ZcaPrecision, ["id"] = Ordering.Id, ["obs"] = Ordering.Obs,
        ["variance"] = Ordering.Variance, ["weight-norm"] = Ordering.WeightNorm, ["fluctuation"] = Ordering.Fluctuation,
        ["wanda-sp"] = Ordering.WandaSp, ["magnitude"] = Ordering.Magnitude, ["random"] = Ordering.Random,
    };

    public static string Name(Ordering o) => Names.First(kv => kv.Value == o).Key;

    public static Ordering Parse(string s, string option = "--ordering") =>
        Names.TryGetValue(s, out var o) ? o : throw new LlmSnpException($"{option}: unknown ordering '{s}' ({string.Join(", ", Names.Keys)})");

    public static bool IsSnp(Ordering o) => o is Ordering.Zca or Ordering.ZcaPrecision or Ordering.Id or Ordering.Obs;

    /// <summary>Group indices, most important first.</summary>
    public static long[] Order(Ordering kind, OrderingInput x)
    {
        using var scope = NewDisposeScope();
        int n = (int)x.Gram.shape[0] - 1, gs = x.GroupSize, groups = n / gs;
        var g = x.Gram;
        var mu = g[0, TensorIndex.Slice(1)];
        // Σ = G_uu − μμᵀ built in one n² buffer (no outer-product temporary), and only for the
        // orderings that read more than its diagonal: n is 8192+ on large MLPs.
        Tensor Sigma() => g.narrow(0, 1, n).narrow(1, 1, n).clone().addr_(mu, mu, 1, -1);
        var w = x.ConsumerWeight.to(ScalarType.Float64);
        var sigmaDiag = g.diagonal().narrow(0, 1, n) - mu.square();
        var dead = sigmaDiag <= 1e-12 * sigmaDiag.mean().clamp_min(1e-300);
        switch (kind)
        {
            case Ordering.Id: return Greedy(PivotedCholesky(Sigma(), gs), groups);
            case Ordering.Obs: return Greedy(ObsBackward(g, w, x.ConsumerBias.to(ScalarType.Float64), gs, x.Damp, x.Layer), groups);
            case Ordering.Random:
                {
                    var rng = new Random(x.Seed);
                    var p = Enumerable.Range(0, groups).Select(i => (long)i).ToArray();
                    rng.Shuffle(p);
                    return p;
                }
        }
        Tensor unitScore;
        switch (kind)
        {
            case Ordering.Zca:
            case Ordering.ZcaPrecision:
                {
                    double eps = 1e-6 * sigmaDiag.mean().item<double>();
                    var sigma = Sigma();
                    using (var d = sigma.diagonal()) d.add_(eps);   // in place: Σ itself is not needed after the eigendecomposition
                    var (evals, evecs) = torch.linalg.eigh(sigma);
                    sigma.Dispose();
                    evals = evals.clamp_min(eps * 1e-3);
                    // (Σ^{-1/2})_ii and (Σ^{-1})_ii from one eigendecomposition.
                    var v2 = evecs.mul_(evecs);
                    unitScore = kind == Ordering.Zca
                        ? 1.0 / v2.mv(evals.rsqrt()).square()
                        : 1.0 / v2.mv(evals.reciprocal());
                    unitScore = torch.where(dead, torch.tensor(double.NegativeInfinity, dtype: ScalarType.Float64, device: g.device), unitScore);
                    break;
                }
            case Ordering.Variance: unitScore = sigmaDiag; break;
            case Ordering.WeightNorm: unitScore = w.square().sum(dim: 0); break;   // squared: same order, summed per group
            case Ordering.Fluctuation: unitScore = sigmaDiag * w.square().sum(dim: 0); break;
            case Ordering.WandaSp:
                unitScore = w.abs().mean(new long[] { 0 }) * (g.diagonal().narrow(0, 1, n) * x.Tokens).sqrt();
                break;
            case Ordering.Magnitude: unitScore = x.ProducerSquaredNorms.to(ScalarType.Float64) + w.square().sum(dim: 0); break;
            default: throw new ArgumentOutOfRangeException(nameof(kind));
        }
        var groupScore = unitScore.reshape(groups, gs).sum(1).cpu();
        var s = groupScore.data<double>().ToArray();
        // Descending score; ties by index so the order is deterministic.
        return Enumerable.Range(0, groups).OrderByDescending(i => s[i]).ThenBy(i => i).Select(i => (long)i).ToArray();
    }

    static long[] Greedy(List<int> picks, int groups) => picks.Select(i => (long)i).ToArray();

    /// <summary>`id`: greedy block-pivoted Cholesky of Σ (overwritten), picking the group with the largest residual trace.</summary>
    static List<int> PivotedCholesky(Tensor sigma, int gs)
    {
        int n = (int)sigma.shape[0], groups = n / gs;
        var r = sigma;
        double eps = 1e-12 * sigma.diagonal().mean().item<double>() + 1e-300;
        var taken = torch.zeros(groups, ScalarType.Bool, sigma.device);
        var order = new List<int>(groups);
        var eye = torch.eye(gs, dtype: ScalarType.Float64, device: sigma.device);
        for (int step = 0; step < groups; step++)
        {
            using var scope = NewDisposeScope();
            var tr = r.diagonal().reshape(groups, gs).sum(1).masked_fill(taken, double.NegativeInfinity);
            int h = (int)tr.argmax().item<long>();
            order.Add(h);
            taken[h] = true;
            var cols = r.narrow(1, h * gs, gs);
            var block = r.narrow(0, h * gs, gs).narrow(1, h * gs, gs);
            // R ← R − R[:,h] (R_hh + εI)⁻¹ R[h,:]  (the residual given the group just taken)
            var upd = cols.mm(torch.linalg.solve(block + eye * eps, cols.t()));
            r.sub_(upd);
        }
        return order;
    }

    /// <summary>
    /// `obs`: greedy backward elimination by exact consumer-output error with H⁻¹ downdates
    /// (block form for heads). The constant unit is never removed. Returns most important first.
    /// </summary>
    static List<int> ObsBackward(Tensor g, Tensor w, Tensor c, int gs, double damp, string layer)
    {
        int n = (int)g.shape[0] - 1, groups = n / gs;
        var (chol, _) = Subspace.DampedCholesky(g, damp, layer);
        var hinv = torch.cholesky_inverse(chol);
        var wp = torch.cat(new[] { c.unsqueeze(1), w }, 1);   // [m, n+1], constant column first
        var removed = torch.zeros(groups, ScalarType.Bool, g.device);
        var removal = new List<int>(groups);
        var unitIdx = torch.arange(1, n + 1, dtype: ScalarType.Int64, device: g.device).reshape(groups, gs);
        for (int step = 0; step < groups; step++)
        {
            using var scope = NewDisposeScope();
            Tensor score, invq;
            int q;
            var removedF = removed.to(ScalarType.Float64);
            if (gs == 1)
            {
                // Scalar units: ‖W'_{:,q}‖² / (H⁻¹)_qq without gathering blocks (removed units: diagonal ≈ 0, masked).
                var diag = hinv.diagonal().narrow(0, 1, n) + removedF;
                score = (wp.narrow(1, 1, n).square().sum(dim: 0) / diag).masked_fill(removed, double.PositiveInfinity);
                q = (int)score.argmin().item<long>();
                invq = diag[q].reciprocal().reshape(1, 1);
            }
            else
            {
                // Blocks (H⁻¹)_hh [groups, gs, gs] and W'_h [groups, m, gs].
                var rows = hinv.index_select(0, unitIdx.reshape(-1)).reshape(groups, gs, n + 1);
                var hh = rows.gather(2, unitIdx.unsqueeze(1).expand(groups, gs, gs));
                var wh = wp.index_select(1, unitIdx.reshape(-1)).reshape(-1, groups, gs).permute(1, 0, 2);
                var eye = torch.eye(gs, dtype: ScalarType.Float64, device: g.device);
                // Removed groups have zero rows; keep their blocks invertible and their scores infinite.
                var inv = torch.linalg.inv(hh + eye * removedF.reshape(groups, 1, 1));
                score = wh.bmm(inv).mul(wh).sum(new long[] { 1, 2 }).masked_fill(removed, double.PositiveInfinity);
                q = (int)score.argmin().item<long>();
                invq = inv[q];
            }
            removal.Add(q);
            var qi = unitIdx[q];
            var hq = hinv.index_select(0, qi);            // [gs, n+1]
            wp.sub_(wp.index_select(1, qi).mm(invq).mm(hq));
            hinv.sub_(hq.t().mm(invq).mm(hq));
            removed[q] = true;
        }
        removal.Reverse();
        return removal;
    }
}
