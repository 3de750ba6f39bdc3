using static TorchSharp.torch;

namespace LlmSnp.Pruning;

public enum ReconstructMode { Lstsq, Bias, None }

/// <summary>A damped factorisation: the damping finally used and how often it was raised.</summary>
public sealed record Damping(double Lambda, int Escalations);

/// <summary>
/// The LDL subspace and least-squares reconstruction (snp.md §4–5, §7), all in float64 on the
/// augmented Gram G (constant unit at index 0).
/// </summary>
public static class Subspace
{
    public const int MaxEscalations = 6;
    const double PivotFloor = 1e-12;

    /// <summary>
    /// Cholesky of <paramref name="a"/> with λ = damp·mean(unit diagonal) added to the unit diagonal
    /// (index 0, the constant, is never damped); λ is raised ×10 while the factorisation fails or a
    /// pivot falls below 1e-12 of its diagonal.
    /// </summary>
    public static (Tensor L, Damping Damping) DampedCholesky(Tensor a, double damp, string layer)
    {
        using var scope = NewDisposeScope();
        long n = a.shape[0];
        var unitDiag = a.diagonal().narrow(0, 1, n - 1);
        double meanDiag = n > 1 ? unitDiag.mean().item<double>() : 1.0;
        if (meanDiag <= 0) meanDiag = 1.0;
        var mask = torch.ones(n, ScalarType.Float64, a.device);
        mask[0] = 0.0;
        double lambda = damp * meanDiag;
        for (int attempt = 0; attempt <= MaxEscalations; attempt++)
        {
            var m = a + torch.diag(mask * lambda);
            var (l, info) = torch.linalg.cholesky_ex(m);
            if (info.item<int>() == 0)
            {
                var pivots = l.diagonal().square() / m.diagonal().clamp_min(double.Epsilon);
                if (pivots.min().item<double>() >= PivotFloor && torch.isfinite(l).all().item<bool>())
                    return (l.MoveToOuterDisposeScope(), new Damping(lambda, attempt));
            }
            lambda = lambda == 0 ? PivotFloor * 10 * meanDiag : lambda * 10;
        }
        throw new LlmSnpException($"{layer}: Gram matrix could not be factorised even with damping raised {MaxEscalations} times (λ = {lambda:G3})");
    }

    /// <summary>
    /// LDL of G in the unit order π (constant first): L unit lower-triangular, D ≥ 0 (snp.md §4).
    /// <paramref name="order"/> lists unit indices (0-based, without the constant).
    /// </summary>
    public static (Tensor L, Tensor D, Damping Damping) Ldl(Tensor g, long[] order, double damp, string layer)
    {
        using var scope = NewDisposeScope();
        var gp = Permute(g, order);
        var (c, damping) = DampedCholesky(gp, damp, layer);
        var cd = c.diagonal();
        var l = c / cd.unsqueeze(0);
        return (l.MoveToOuterDisposeScope(), cd.square().MoveToOuterDisposeScope(), damping);
    }

    /// <summary>
    /// Residual energy per group in π order (the D of §6): for each group, tr of the Schur complement
    /// of its block given the constant and all earlier groups = ‖C_block‖²_F of the Cholesky factor.
    /// </summary>
    public static double[] GroupResiduals(Tensor g, long[] unitOrder, int groupSize, double damp, string layer)
    {
        using var scope = NewDisposeScope();
        var gp = Permute(g, unitOrder);
        var (c, _) = DampedCholesky(gp, damp, layer);
        int groups = unitOrder.Length / groupSize;
        var cu = c.narrow(0, 1, unitOrder.Length).narrow(1, 1, unitOrder.Length);
        // Row r's entries within its own diagonal block: the block of rows r and the same columns.
        var blocks = cu.reshape(groups, groupSize, groups, groupSize).diagonal(0, 0, 2);   // [gs, gs, groups]
        var d = blocks.square().sum(new long[] { 0, 1 }).cpu();
        return d.data<double>().ToArray();
    }

    /// <summary>G restricted and reordered to the constant followed by the given units.</summary>
    public static Tensor Permute(Tensor g, long[] units)
    {
        var idx = new long[units.Length + 1];
        for (int i = 0; i < units.Length; i++) idx[i + 1] = units[i] + 1;
        using var t = torch.tensor(idx, device: g.device);
        return g.index_select(0, t).index_select(1, t);
    }

    public sealed record Reconstruction(Tensor Weight, Tensor Bias, double Error, double RelativeError, Damping Damping);

    /// <summary>
    /// Folds the pruned units into the consumer (snp.md §5). <paramref name="kept"/> and
    /// <paramref name="pruned"/> are unit indices; the new weight's columns follow <paramref name="kept"/>.
    /// The reported error is measured against the undamped G: it is the mean over calibration
    /// tokens of ‖y − ŷ‖², whatever damping the solve needed.
    /// </summary>
    public static Reconstruction Reconstruct(Tensor g, Tensor w, Tensor c, long[] kept, long[] pruned, ReconstructMode mode, double damp, string layer)
    {
        using var scope = NewDisposeScope();
        var dev = g.device;
        w = w.to(ScalarType.Float64); c = c.to(ScalarType.Float64);
        var kAug = new long[kept.Length + 1];
        for (int i = 0; i < kept.Length; i++) kAug[i + 1] = kept[i] + 1;
        var pAug = pruned.Select(p => p + 1).ToArray();
        var kIdx = torch.tensor(kAug, device: dev);
        var keptIdx = torch.tensor(kept, device: dev);
        var wk = w.index_select(1, keptIdx);
        var damping = new Damping(0, 0);
        var n = g.shape[0] - 1;
        // tr(W Σ Wᵀ) with Σ = G_uu − μμᵀ, without forming Σ (an n² temporary).
        var wmu = w.mv(g[0].narrow(0, 1, n));
        double total = w.mm(g.narrow(0, 1, n).narrow(1, 1, n)).mul(w).sum().item<double>() - wmu.dot(wmu).item<double>();
        if (pruned.Length == 0)
            return Done(new Reconstruction(wk.MoveToOuterDisposeScope(), c.clone().MoveToOuterDisposeScope(), 0, 0, damping));

        var pIdx = torch.tensor(pAug, device: dev);
        var prunedIdx = torch.tensor(pruned, device: dev);
        var wp = w.index_select(1, prunedIdx);
        var gkk = g.index_select(0, kIdx).index_select(1, kIdx);
        var gkp = g.index_select(0, kIdx).index_select(1, pIdx);
        var gpp = g.index_select(0, pIdx).index_select(1, pIdx);
        Tensor b;   // [|K|, |P|]: x_P ≈ Bᵀ x_K
        switch (mode)
        {
            case ReconstructMode.Lstsq:
                var (lk, dk) = DampedCholesky(gkk, damp, layer);
                damping = dk;
                b = torch.cholesky_solve(gkp, lk);
                break;
            case ReconstructMode.Bias:
                b = torch.zeros(kAug.Length, pruned.Length, ScalarType.Float64, dev);
                b[0] = gkp[0];   // the constant row carries μ_P
                break;
            default:
                b = torch.zeros(kAug.Length, pruned.Length, ScalarType.Float64, dev);
                break;
        }
        var b0 = b[0];
        var a = b.narrow(0, 1, kept.Length);
        var wNew = wk + wp.mm(a.t());
        var cNew = c + wp.mv(b0);
        // Residual second moment of x_P − Bᵀx_K under the true G.
        var m = gpp - b.t().mm(gkp) - gkp.t().mm(b) + b.t().mm(gkk).mm(b);
        double err = wp.mm(m).mul(wp).sum().item<double>();
        double rel = total > 0 ? err / total : 0;
        return Done(new Reconstruction(wNew.MoveToOuterDisposeScope(), cNew.MoveToOuterDisposeScope(), err, rel, damping));

        Reconstruction Done(Reconstruction r)
        {
            if (!torch.isfinite(r.Weight).all().item<bool>() || !torch.isfinite(r.Bias).all().item<bool>())
                throw new LlmSnpException($"{layer}: reconstruction produced non-finite weights");
            return r;
        }
    }
}
