using static TorchSharp.torch;

namespace LlmSnp.Pruning;

/// <summary>
/// How pruned units are folded into the consumer (snp.md §5). `Lstsq` solves with the constant unit (the
/// mean term) where the consumer has a bias to hold it, and without (uncentred second moment) where it
/// has none; `LstsqNoBias` / `LstsqBias` force either form (the latter adds a bias); `Bias` folds only the
/// means (FLAP); `None` drops the units.
/// </summary>
public enum ReconstructMode { Lstsq, LstsqNoBias, LstsqBias, Bias, None }

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
    /// pivot falls below 1e-12 of its diagonal. With <paramref name="overwrite"/> the damping is added
    /// to <paramref name="a"/> itself (it is left holding a + λ·I_units), saving an n² copy.
    /// </summary>
    public static (Tensor L, Damping Damping) DampedCholesky(Tensor a, double damp, string layer, bool overwrite = false, bool constantFirst = true)
    {
        using var scope = NewDisposeScope();
        long n = a.shape[0];
        var diag0 = a.diagonal().clone();
        int first = constantFirst ? 1 : 0;
        double meanDiag = n > first ? diag0.narrow(0, first, n - first).mean().item<double>() : 1.0;
        if (meanDiag <= 0) meanDiag = 1.0;
        var mask = torch.ones(n, ScalarType.Float64, a.device);
        if (constantFirst) mask[0] = 0.0;
        var m = overwrite ? a : a.clone();
        double lambda = damp * meanDiag, tried = lambda;
        for (int attempt = 0; attempt <= MaxEscalations; attempt++)
        {
            // Each attempt in its own scope: a rejected factor (and the views of it) is freed before the next.
            using var attemptScope = NewDisposeScope();
            // In place on the diagonal: no dense diag(λ) and no second n² sum.
            m.diagonal().copy_(diag0 + mask * lambda);
            var (l, info) = torch.linalg.cholesky_ex(m);
            if (info.item<int>() == 0)
            {
                var pivots = l.diagonal().square() / m.diagonal().clamp_min(double.Epsilon);
                if (pivots.min().item<double>() >= PivotFloor && AllFinite(l))
                    return (l.MoveToOuterDisposeScope().MoveToOuterDisposeScope(), new Damping(lambda, attempt));
            }
            tried = lambda;
            lambda = lambda == 0 ? PivotFloor * 10 * meanDiag : lambda * 10;
        }
        throw new LlmSnpException($"{layer}: Gram matrix could not be factorised even with damping raised {MaxEscalations} times (λ = {tried:G3})");
    }

    /// <summary>
    /// Whether every element is finite, checked a band of rows at a time: torch.isfinite of an n² F64
    /// matrix allocates an n² |x| temporary (0.5 GB for an 8192-wide MLP's Gram).
    /// </summary>
    public static bool AllFinite(Tensor t)
    {
        const long BandElements = 1 << 22;
        using var scope = NewDisposeScope();
        long n = t.numel();
        if (t.dim() == 0 || n <= BandElements) return torch.isfinite(t).all().item<bool>();
        long rows = t.shape[0], band = Math.Max(1, BandElements / (n / rows));
        for (long i = 0; i < rows; i += band)
            if (!torch.isfinite(t.narrow(0, i, Math.Min(band, rows - i))).all().item<bool>()) return false;
        return true;
    }

    /// <summary>
    /// LDL of G in the unit order π (constant first): L unit lower-triangular, D ≥ 0 (snp.md §4).
    /// <paramref name="order"/> lists unit indices (0-based, without the constant).
    /// </summary>
    public static (Tensor L, Tensor D, Damping Damping) Ldl(Tensor g, long[] order, double damp, string layer)
    {
        using var scope = NewDisposeScope();
        var gp = Permute(g, order);
        var (c, damping) = DampedCholesky(gp, damp, layer, overwrite: true);
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
        var (c, _) = DampedCholesky(gp, damp, layer, overwrite: true);
        gp.Dispose();
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
        return Submatrix(g, t, t);
    }

    /// <summary>
    /// m[rows][:, cols], gathered a band of rows at a time: one index_select over all rows would first
    /// build a rows × n temporary, and 2-D advanced indexing expands int64 indices to the result's shape.
    /// </summary>
    static Tensor Submatrix(Tensor m, Tensor rows, Tensor cols)
    {
        const long Band = 512;
        long r = rows.shape[0];
        var result = torch.empty(r, cols.shape[0], m.dtype, m.device);
        for (long i = 0; i < r; i += Band)
        {
            using var scope = NewDisposeScope();
            long len = Math.Min(Band, r - i);
            result.narrow(0, i, len).copy_(m.index_select(0, rows.narrow(0, i, len)).index_select(1, cols));
        }
        return result;
    }

    public sealed record Reconstruction(Tensor Weight, Tensor? Bias, double Error, double RelativeError, Damping Damping, bool Constant);

    /// <summary>Whether a reconstruction solves with the constant unit (and so gives the consumer a bias).</summary>
    public static bool UsesConstant(ReconstructMode mode, bool consumerHasBias) => mode switch
    {
        ReconstructMode.LstsqNoBias => false,
        ReconstructMode.LstsqBias or ReconstructMode.Bias => true,
        _ => consumerHasBias,
    };

    /// <summary>
    /// Folds the pruned units into the consumer (snp.md §5). <paramref name="kept"/> and
    /// <paramref name="pruned"/> are unit indices; the new weight's columns follow <paramref name="kept"/>.
    /// With the constant unit (see <see cref="UsesConstant"/>) the solve is centred and the consumer's bias
    /// (zero where it had none) absorbs the mean term; without it, the uncentred least squares leaves the
    /// bias as it was. The reported error is measured against the undamped G: it is the mean over
    /// calibration tokens of ‖y − ŷ‖², whatever damping the solve needed. With <paramref name="releaseGram"/>,
    /// G is disposed as soon as its kept/pruned blocks are gathered, so the n² Gram and the
    /// |K|² factor are never resident together (the peak of a wide MLP).
    /// </summary>
    public static Reconstruction Reconstruct(Tensor g, Tensor w, Tensor? c, long[] kept, long[] pruned, ReconstructMode mode, double damp, string layer, bool releaseGram = false)
    {
        using var scope = NewDisposeScope();
        var dev = g.device;
        bool constant = UsesConstant(mode, c is not null);
        w = w.to(ScalarType.Float64);
        var c64 = c?.to(ScalarType.Float64) ?? (constant ? torch.zeros(w.shape[0], ScalarType.Float64, dev) : null);
        int off = constant ? 1 : 0;
        var kAug = new long[kept.Length + off];
        for (int i = 0; i < kept.Length; i++) kAug[i + off] = kept[i] + 1;
        var pAug = pruned.Select(p => p + 1).ToArray();
        var kIdx = torch.tensor(kAug, device: dev);
        var keptIdx = torch.tensor(kept, device: dev);
        var wk = w.index_select(1, keptIdx);
        var damping = new Damping(0, 0);
        var n = g.shape[0] - 1;
        double total, g00;
        // Views of G live in this inner scope only: any view left alive would keep G's storage when it is released.
        using (NewDisposeScope())
        {
            // tr(W Σ Wᵀ) with Σ = G_uu − μμᵀ, without forming Σ: W·G[1:, :] reads G's rows in place.
            var wmu = w.mv(g[0].narrow(0, 1, n));
            total = w.mm(g.narrow(0, 1, n)).narrow(1, 1, n).mul_(w).sum().item<double>() - wmu.dot(wmu).item<double>();
            g00 = g[0, 0].item<double>();
        }
        if (pruned.Length == 0)
        {
            if (releaseGram) g.Dispose();
            return Done(new Reconstruction(wk.MoveToOuterDisposeScope(), c64?.clone().MoveToOuterDisposeScope(), 0, 0, damping, constant));
        }

        var pIdx = torch.tensor(pAug, device: dev);
        var prunedIdx = torch.tensor(pruned, device: dev);
        var wp = w.index_select(1, prunedIdx);
        bool lstsq = mode is ReconstructMode.Lstsq or ReconstructMode.LstsqNoBias or ReconstructMode.LstsqBias;
        var gkk = lstsq ? Submatrix(g, kIdx, kIdx) : null;
        var gkp = Submatrix(g, kIdx, pIdx);
        var gpp = Submatrix(g, pIdx, pIdx);
        if (releaseGram) g.Dispose();
        Tensor b, m;   // b [|K| (+1), |P|]: x_P ≈ Bᵀ x_K;  m: residual second moment of x_P − Bᵀx_K under the true G
        if (lstsq)
        {
            // Factor G_KK + Λ in place (Λ = λ on the unit diagonal): G_KK itself is not needed again,
            // since with B = (G_KK + Λ)⁻¹ G_KP, Bᵀ G_KK B = Bᵀ G_KP − λ B_uᵀ B_u.
            var (lk, dk) = DampedCholesky(gkk!, damp, layer, overwrite: true, constantFirst: constant);
            gkk!.Dispose();
            damping = dk;
            b = torch.cholesky_solve(gkp, lk);
            lk.Dispose();
            var bu = b.narrow(0, off, kept.Length);
            m = gpp - gkp.t().mm(b);
            if (dk.Lambda != 0) m.sub_(bu.t().mm(bu).mul_(dk.Lambda));
        }
        else
        {
            // B is zero but for the constant row (μ_P under Bias): x_P − Bᵀx_K = x_P − b₀.
            b = torch.zeros(kAug.Length, pruned.Length, ScalarType.Float64, dev);
            if (mode == ReconstructMode.Bias) b[0] = gkp[0];   // the constant row carries μ_P
            if (constant)
            {
                var b0 = b[0];
                m = gpp - torch.outer(b0, gkp[0]) - torch.outer(gkp[0], b0) + torch.outer(b0, b0).mul_(g00);
            }
            else m = gpp;
        }
        var wNew = wk + wp.mm(b.narrow(0, off, kept.Length).t());
        var cNew = constant ? c64! + wp.mv(b[0]) : c64;
        double err = wp.mm(m).mul(wp).sum().item<double>();
        double rel = total > 0 ? err / total : 0;
        return Done(new Reconstruction(wNew.MoveToOuterDisposeScope(), cNew?.MoveToOuterDisposeScope(), err, rel, damping, constant));

        Reconstruction Done(Reconstruction r)
        {
            if (!AllFinite(r.Weight) || (r.Bias is not null && !AllFinite(r.Bias)))
                throw new LlmSnpException($"{layer}: reconstruction produced non-finite weights");
            return r;
        }
    }
}
