namespace LlmSnp.Pruning;

public enum RatioPolicyKind { Ratio, Variance, Budget }

/// <summary>Everything that decides what the engine removes (snp.md §3–7).</summary>
public sealed record PruneOptions
{
    public Ordering Ordering { get; init; } = Ordering.Zca;
    public ReconstructMode Reconstruct { get; init; } = ReconstructMode.Lstsq;
    public RatioPolicyKind Policy { get; init; } = RatioPolicyKind.Variance;
    /// <summary>r for Ratio, τ for Variance, p for Budget.</summary>
    public double Amount { get; init; } = 0.99;
    public bool PruneHeads { get; init; } = true;
    public bool PruneMlp { get; init; } = true;
    public double Damp { get; init; } = 0.01;
    public int Seed { get; init; }

    public bool Targets(NodeKind k) => k == NodeKind.Heads ? PruneHeads : PruneMlp;

    public void Validate()
    {
        switch (Policy)
        {
            case RatioPolicyKind.Ratio when !(Amount >= 0 && Amount < 1):
                throw new LlmSnpException($"--ratio must be in [0, 1) (got {Amount})");
            case RatioPolicyKind.Variance when !(Amount > 0 && Amount <= 1):
                throw new LlmSnpException($"--variance must be in (0, 1] (got {Amount})");
            case RatioPolicyKind.Budget when !(Amount >= 0 && Amount < 1):
                throw new LlmSnpException($"--budget must be in [0, 1) (got {Amount})");
        }
        if (!PruneHeads && !PruneMlp) throw new LlmSnpException("--targets selects nothing to prune (use mlp, heads or mlp,heads)");
        if (!(Damp >= 0) || double.IsInfinity(Damp)) throw new LlmSnpException($"--damp must be a non-negative number (got {Damp})");
    }

    public string PolicyName => Policy switch { RatioPolicyKind.Ratio => "ratio", RatioPolicyKind.Variance => "variance", _ => "budget" };
}

public static class ReconstructModes
{
    public static readonly IReadOnlyDictionary<string, ReconstructMode> Names = new Dictionary<string, ReconstructMode>
    {
        ["lstsq"] = ReconstructMode.Lstsq, ["lstsq-nobias"] = ReconstructMode.LstsqNoBias, ["lstsq-bias"] = ReconstructMode.LstsqBias,
        ["bias"] = ReconstructMode.Bias, ["none"] = ReconstructMode.None,
    };

    public static string Name(ReconstructMode m) => Names.First(kv => kv.Value == m).Key;

    public static ReconstructMode Parse(string s) =>
        Names.TryGetValue(s, out var m) ? m : throw new LlmSnpException($"unknown reconstruction '{s}' ({string.Join(", ", Names.Keys)})");
}

/// <summary>How many groups a node layer keeps (snp.md §6). Floors: at least one group.</summary>
public static class RatioPolicy
{
    public static int KeepForRatio(int groups, double r) => Math.Clamp(groups - (int)Math.Round(r * groups), 1, groups);

    /// <summary>Smallest k with Σ_{j≤k} D_j ≥ τ·Σ_j D_j (D in π order); τ ≥ 1 keeps everything.</summary>
    public static int KeepForVariance(IReadOnlyList<double> d, double tau)
    {
        if (tau >= 1) return d.Count;
        double total = d.Sum(), cum = 0;
        for (int k = 0; k < d.Count; k++)
        {
            cum += d[k];
            if (cum >= tau * total) return Math.Max(1, k + 1);
        }
        return d.Count;
    }

    /// <summary>
    /// τ whose per-layer kept counts remove the fraction closest to <paramref name="budget"/> of the
    /// prunable parameters (bisection: the removed fraction falls as τ grows).
    /// </summary>
    public static (double Tau, int[] Keep) PlanBudget(IReadOnlyList<(double[] D, long ParamsPerGroup)> layers, double budget)
    {
        long total = layers.Sum(l => l.D.Length * l.ParamsPerGroup);
        double Removed(int[] keep) => layers.Select((l, i) => (double)(l.D.Length - keep[i]) * l.ParamsPerGroup).Sum() / total;
        int[] KeepAt(double tau) => layers.Select(l => KeepForVariance(l.D, tau)).ToArray();
        if (budget <= 0) return (1.0, layers.Select(l => l.D.Length).ToArray());
        double lo = 0, hi = 1;   // removed(lo) ≥ budget ≥ removed(hi)
        for (int it = 0; it < 60; it++)
        {
            double mid = 0.5 * (lo + hi);
            if (Removed(KeepAt(mid)) >= budget) lo = mid; else hi = mid;
        }
        var kLo = KeepAt(lo); var kHi = KeepAt(hi);
        return Math.Abs(Removed(kLo) - budget) <= Math.Abs(Removed(kHi) - budget) ? (lo, kLo) : (hi, kHi);
    }
}
