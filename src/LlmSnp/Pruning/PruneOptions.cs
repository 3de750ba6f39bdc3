using LlmSnp.Models;

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
    /// <summary>The node kinds pruned (`--targets`).</summary>
    public IReadOnlySet<NodeKind> Targets { get; init; } = new HashSet<NodeKind> { NodeKind.Mlp, NodeKind.Heads };
    public double Damp { get; init; } = 0.01;
    public int Seed { get; init; }
    /// <summary>
    /// Every layer keeps the same number of groups per node kind (ratio, budget), so the stock config of the family can
    /// state the pruned widths; SNP still chooses which groups each layer keeps.
    /// </summary>
    public bool UniformWidths { get; init; }
    /// <summary>
    /// Every pruned MLP layer keeps a multiple of this many neurons (nearest to the policy's count). Runtimes' fast
    /// GEMM kernels want the inner dimension aligned: llama.cpp's F16/F32 tinyBLAS needs a multiple of 16 with AVX-512
    /// (8 with AVX2) and otherwise falls back to a much slower path for the whole down_proj.
    /// </summary>
    public int WidthMultiple { get; init; } = 1;
    /// <summary>Expert removal in mixtures (`--experts-keep`); null: every expert stays.</summary>
    public ExpertOptions? Experts { get; init; }
    /// <summary>Experts with fewer calibration tokens than neurons (`--experts-few-tokens`).</summary>
    public FewTokenPolicy FewTokenExperts { get; init; } = FewTokenPolicy.Damp;

    /// <summary>Whether a node kind is pruned: `mlp` covers every MLP neuron, the experts' too; `experts` only theirs.</summary>
    public bool Prunes(NodeKind k) => Targets.Contains(k) || (k == NodeKind.Expert && Targets.Contains(NodeKind.Mlp));

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
        if (UniformWidths && Policy == RatioPolicyKind.Variance)
            throw new LlmSnpException("--uniform works with --ratio or --budget: --variance chooses each layer's width from its own spectrum");
        if (WidthMultiple < 1) throw new LlmSnpException($"--width-multiple must be a positive integer (got {WidthMultiple})");
        if (Targets.Count == 0) throw new LlmSnpException("--targets selects nothing to prune (use mlp, heads or mlp,heads)");
        Experts?.Validate();
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

    public static ReconstructMode Parse(string s, string option = "--reconstruct") =>
        Names.TryGetValue(s, out var m) ? m : throw new LlmSnpException($"{option}: unknown reconstruction '{s}' ({string.Join(", ", Names.Keys)})");
}

/// <summary>How many groups a node layer keeps (snp.md §6). Floors: at least one group.</summary>
public static class RatioPolicy
{
    public static int KeepForRatio(int groups, double r) => Math.Clamp(groups - (int)Math.Round(r * groups), 1, groups);

    /// <summary>
    /// <paramref name="keep"/> moved to the nearest multiple of <paramref name="multiple"/> (ties up), at least one
    /// multiple; where that would pass the layer's width, or the policy keeps it whole, the layer stays whole.
    /// </summary>
    public static int RoundToMultiple(int keep, int units, int multiple)
    {
        if (multiple <= 1 || keep >= units) return Math.Min(keep, units);
        int nearest = (int)Math.Round((double)keep / multiple, MidpointRounding.AwayFromZero) * multiple;
        return nearest > units ? units : Math.Max(nearest, multiple);
    }

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

    /// <summary>
    /// Budget with equal widths: one kept count per node kind, the same in every layer, whose removed parameters are
    /// closest to <paramref name="budget"/> of the prunable ones. Many (heads, MLP) pairs remove exactly as much (a head
    /// costs a whole number of neurons); among those the pair that drops the least residual variance wins, summed over
    /// layers as fractions of each layer's total (the D of the dense pass), so heads and neurons are weighed alike.
    /// Every layer of a kind must have the same group count (the source's widths are uniform).
    /// </summary>
    public static Dictionary<NodeKind, int> PlanUniformBudget(IReadOnlyList<(double[] D, long ParamsPerGroup, NodeKind Kind)> layers, double budget)
    {
        var kinds = layers.Select(l => l.Kind).Distinct().OrderBy(k => k).ToArray();
        var groups = new Dictionary<NodeKind, int>();
        var cost = new Dictionary<NodeKind, long>();   // parameters per group, summed over the layers of the kind
        foreach (var k in kinds)
        {
            var of = layers.Where(l => l.Kind == k).ToArray();
            if (of.Select(l => l.D.Length).Distinct().Count() > 1)
                throw new LlmSnpException($"--uniform: the source's {(k == NodeKind.Heads ? "head" : k == NodeKind.Expert ? "expert" : "MLP")} widths differ across layers ({string.Join(", ", of.Select(l => l.D.Length))})");
            groups[k] = of[0].D.Length;
            cost[k] = of.Sum(l => l.ParamsPerGroup);
        }
        if (kinds.Length > 2)
            throw new LlmSnpException($"--uniform --budget plans at most two node kinds, not {string.Join(", ", kinds.Select(NodeKinds.Name))} (a mixture with dense layers): use --uniform --ratio, or --targets to choose two");
        long total = kinds.Sum(k => groups[k] * cost[k]);
        double target = budget * total;
        double Dropped(NodeKind k, int keep) => layers.Where(l => l.Kind == k).Sum(l =>
        {
            double all = l.D.Sum();
            return all > 0 ? l.D.Skip(keep).Sum() / all : 0;
        });
        // The first kind is enumerated, the last solved for (floor and ceil of the exact count); with one kind the loop is one pass.
        NodeKind last = kinds[^1];
        int firstMax = kinds.Length == 2 ? groups[kinds[0]] : 1;
        (double Dist, double Loss, int First, int Last) best = (double.PositiveInfinity, 0, 0, 0);
        for (int x1 = 1; x1 <= firstMax; x1++)
        {
            double removed1 = kinds.Length == 2 ? (double)(groups[kinds[0]] - x1) * cost[kinds[0]] : 0;
            double exact = groups[last] - (target - removed1) / cost[last];
            foreach (int x2 in new[] { (int)Math.Floor(exact), (int)Math.Ceiling(exact) }.Select(x => Math.Clamp(x, 1, groups[last])).Distinct())
            {
                double dist = Math.Abs(removed1 + (double)(groups[last] - x2) * cost[last] - target);
                double loss = Dropped(last, x2) + (kinds.Length == 2 ? Dropped(kinds[0], x1) : 0);
                // Removed counts are whole parameters, so equal distances are equal removals (up to rounding of the sum).
                if (dist < best.Dist - 1e-6 || (dist <= best.Dist + 1e-6 && loss < best.Loss))
                    best = (Math.Min(dist, best.Dist), loss, x1, x2);
            }
        }
        var plan = new Dictionary<NodeKind, int> { [last] = best.Last };
        if (kinds.Length == 2) plan[kinds[0]] = best.First;
        return plan;
    }
}
