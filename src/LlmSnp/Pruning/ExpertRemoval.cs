using System.Globalization;
using LlmSnp.Models;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Pruning;

/// <summary>How the experts a layer keeps are chosen (docs/models.md "Expert removal").</summary>
public enum ExpertCriterion
{
    /// <summary>Backward elimination on the experts' contributions: each removal is the one whose loss the least squares of the kept contributions recovers best.</summary>
    Snp,
    /// <summary>REAP (Lasby et al. 2025): mean over the tokens routed to an expert of router weight × ‖expert output‖.</summary>
    Reap,
    /// <summary>How many calibration tokens the router sends to the expert.</summary>
    Frequency,
}

/// <summary>What the kept experts absorb of the removed ones' contribution.</summary>
public enum ExpertFold
{
    /// <summary>Each kept expert's down_proj is scaled by the least-squares factor that best restores the layer's output under the new routing.</summary>
    Scale,
    /// <summary>Removed experts are dropped; the router renormalises over the kept ones.</summary>
    None,
}

/// <summary>What becomes of an expert whose calibration tokens are fewer than its neurons (its Gram is singular).</summary>
public enum FewTokenPolicy
{
    /// <summary>Pruned like the others, on the damped Gram (no tokens at all: ordered by weight norms, nothing reconstructed).</summary>
    Damp,
    /// <summary>Kept at its full width (not with equal widths, which need every expert pruned alike).</summary>
    KeepWhole,
}

/// <summary>`--experts-keep` and its companions: how many experts every sparse layer keeps, chosen how, and the fold.</summary>
public sealed record ExpertOptions
{
    /// <summary>Experts kept per sparse layer; or <see cref="KeepFraction"/> of them.</summary>
    public int? Keep { get; init; }
    public double? KeepFraction { get; init; }
    public ExpertCriterion Criterion { get; init; } = ExpertCriterion.Snp;
    public ExpertFold Fold { get; init; } = ExpertFold.Scale;

    public static readonly IReadOnlyDictionary<string, ExpertCriterion> Criteria = new Dictionary<string, ExpertCriterion>
    {
        ["snp"] = ExpertCriterion.Snp, ["reap"] = ExpertCriterion.Reap, ["frequency"] = ExpertCriterion.Frequency,
    };

    public static readonly IReadOnlyDictionary<string, ExpertFold> Folds = new Dictionary<string, ExpertFold>
    {
        ["scale"] = ExpertFold.Scale, ["none"] = ExpertFold.None,
    };

    public static string Name(ExpertCriterion c) => Criteria.First(kv => kv.Value == c).Key;
    public static string Name(ExpertFold f) => Folds.First(kv => kv.Value == f).Key;

    /// <summary>`--experts-keep K` (a whole number of experts) or a fraction in (0, 1) of each layer's experts.</summary>
    public static ExpertOptions Parse(string keep, string criterion, string fold)
    {
        var c = Criteria.TryGetValue(criterion, out var cv) ? cv : throw new LlmSnpException($"--experts-criterion: unknown criterion '{criterion}' ({string.Join(", ", Criteria.Keys)})");
        var f = Folds.TryGetValue(fold, out var fv) ? fv : throw new LlmSnpException($"--experts-fold: unknown fold '{fold}' ({string.Join(", ", Folds.Keys)})");
        string s = keep.Trim();
        if (int.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out int k))
            return new ExpertOptions { Keep = k, Criterion = c, Fold = f };
        if (double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double x) && double.IsFinite(x) && x > 0 && x < 1)
            return new ExpertOptions { KeepFraction = x, Criterion = c, Fold = f };
        throw new LlmSnpException($"--experts-keep: '{keep}' is neither a whole number of experts nor a fraction in (0, 1)");
    }

    public void Validate()
    {
        if ((Keep is null) == (KeepFraction is null)) throw new LlmSnpException("--experts-keep: give a number of experts or a fraction");
        if (Keep is int k && k < 1) throw new LlmSnpException($"--experts-keep {k}: every sparse layer must keep at least one expert");
        if (KeepFraction is double x && !(x > 0 && x < 1)) throw new LlmSnpException($"--experts-keep {x}: a fraction must be in (0, 1)");
    }

    /// <summary>Experts a layer of <paramref name="experts"/> keeps (a fraction rounds to the nearest count, at least one).</summary>
    public int KeepFor(int experts) => Keep ?? Math.Max(1, (int)Math.Round(KeepFraction!.Value * experts, MidpointRounding.AwayFromZero));

    public string Describe() => Keep is int k ? k.ToString(CultureInfo.InvariantCulture) : KeepFraction!.Value.ToString(CultureInfo.InvariantCulture);

    /// <summary>Whether the model can do what the options ask: one line naming the option and the config field otherwise.</summary>
    public void CheckAgainst(IPrunableModel model)
    {
        if (model is not IMixtureModel m || m.Experts == 0)
            throw new LlmSnpException($"--experts-keep {Describe()}: {model.ModelDir} is a dense {model.Family} model; it has no experts to remove");
        int keep = KeepFor(m.Experts);
        if (keep > m.Experts)
            throw new LlmSnpException($"--experts-keep {Describe()}: the model has {m.Experts} experts per sparse layer ({m.ExpertsField})");
        if (keep < m.TopK)
            throw new LlmSnpException($"--experts-keep {Describe()}: keeps {keep} experts, below the {m.TopK} the router chooses per token (num_experts_per_tok)");
    }
}

/// <summary>One expert's calibration evidence and fate in one sparse layer (original expert index).</summary>
/// <param name="Tokens">Tokens the router sent to it before any removal.</param>
/// <param name="TokensAfter">Tokens it receives once the removed experts' tokens are rerouted (0 for a removed expert).</param>
public sealed record ExpertRecord(long Expert, long Tokens, long TokensAfter, double Score, bool Kept, double Scale, string? Why);

/// <summary>What happened to the experts of one sparse layer.</summary>
public sealed record MixtureReport
{
    public required string Name { get; init; }
    public required int Experts { get; init; }
    public required int TopK { get; init; }
    /// <summary>Experts kept, original indices in the order they are written.</summary>
    public required long[] Kept { get; init; }
    /// <summary>Per original expert, in index order.</summary>
    public required IReadOnlyList<ExpertRecord> Records { get; init; }
    /// <summary>Calibration tokens (each routed to top-k experts).</summary>
    public required long Tokens { get; init; }
    /// <summary>Criterion and fold (null where no expert removal ran).</summary>
    public string? Criterion { get; init; }
    public string? Fold { get; init; }
    /// <summary>‖y − ŷ‖² / ‖y‖² of the layer's mixture output over the calibration tokens: the removed experts dropped and rerouted, then with the fold.</summary>
    public double? RelativeErrorRemoved { get; init; }
    public double? RelativeErrorFolded { get; init; }
    /// <summary>Experts with fewer calibration tokens than neurons, and what was done with them.</summary>
    public IReadOnlyList<(long Expert, long Tokens, string Handled)> FewTokens { get; init; } = Array.Empty<(long, long, string)>();
}

/// <summary>
/// Expert removal in one sparse layer (docs/models.md "Expert removal"). Pass 1 routes the calibration stream as the
/// model does and measures, per expert, its tokens, REAP's saliency and the Gram of the experts' contributions
/// c_e = w_e · f_e(x) (zero where the router did not choose e), whose sum over experts is the layer's output y. The
/// kept experts are chosen, the block drops the others (the router loses their rows and reroutes among the kept).
/// Pass 2, the one that also collects the kept experts' neuron Grams, routes again and fits the fold: one scale per
/// kept expert, s = argmin Σ_t ‖y_t − Σ_k s_k u_tk‖² with u the kept experts' new contributions — exact to fold,
/// since s_k · down_proj_k is a down_proj — ridge-damped towards 1 (no change).
/// </summary>
public sealed class ExpertRemoval : IDisposable
{
    readonly IMixtureBlock _block;
    readonly ExpertOptions _opt;
    readonly double _damp;
    readonly string _name;
    readonly long[] _original;          // the block's experts before removal (original indices)
    readonly long[] _tokens;            // per expert, pass 1
    readonly double[] _scores;          // the criterion's score per expert (higher: more important)
    readonly string[] _why;
    readonly long[] _keptPositions;     // positions in _original
    readonly List<Tensor> _outputs;     // y per micro-batch [N, hidden]
    Tensor? _foldGram, _foldB;          // K×K and K (float64), pass 2
    double _residual, _energy;
    long _calibTokens;

    public long[] KeptExperts => _keptPositions.Select(p => _original[p]).ToArray();

    ExpertRemoval(IMixtureBlock block, ExpertOptions opt, double damp, string name, long[] original, long[] tokens, double[] scores, string[] why,
        long[] keptPositions, List<Tensor> outputs, long calibTokens)
    {
        _block = block; _opt = opt; _damp = damp; _name = name; _original = original; _tokens = tokens; _scores = scores; _why = why;
        _keptPositions = keptPositions; _outputs = outputs; _calibTokens = calibTokens;
    }

    /// <summary>Contributions by routing slot ([N·k, hidden]) and the expert of each slot, from one routed micro-batch.</summary>
    sealed class SlotContributions
    {
        public readonly Tensor C, Expert;
        public SlotContributions(long slots, long hidden, ScalarType dtype, Device device)
        {
            C = torch.zeros(slots, hidden, dtype, device);
            Expert = torch.zeros(slots, ScalarType.Int64, device);
        }

        /// <summary>The expert's output f = down(a) and its contribution w·f at its slots.</summary>
        public Tensor Add(IMixtureBlock block, RoutedBatch r)
        {
            var (down, bias) = block.Consumer(r.Layer);
            var f = F.linear(r.Activations, down, bias);
            C.index_copy_(0, r.Slots, f * r.Weights.unsqueeze(1));
            Expert.index_fill_(0, r.Slots, r.Expert);
            return f;
        }

        /// <summary>Σ over tokens of ⟨c_i, c_j⟩ for every pair of slots of a token, added to gram[expert_i, expert_j].</summary>
        public void AddPairs(Tensor gram, int k)
        {
            long n = C.shape[0] / k, e = gram.shape[0];
            var c3 = C.view(n, k, -1);
            var p = torch.bmm(c3, c3.transpose(1, 2)).to(ScalarType.Float64);
            var sel = Expert.view(n, k);
            var pair = sel.unsqueeze(2) * e + sel.unsqueeze(1);
            gram.view(-1).index_add_(0, pair.reshape(-1), p.reshape(-1), 1);
        }

        public Tensor Sum(int k) => C.view(C.shape[0] / k, k, -1).sum(1);
    }

    /// <summary>
    /// Pass 1 and the choice: measures the experts on <paramref name="hidden"/> (the stream entering the expert
    /// sub-block), keeps <see cref="ExpertOptions.KeepFor"/> of them (or <paramref name="forced"/>, original indices,
    /// where a budget plan already chose) and removes the rest from the block.
    /// </summary>
    public static ExpertRemoval Begin(IMixtureBlock block, IReadOnlyList<Tensor> hidden, ExpertOptions opt, double damp, string name, long[]? forced = null)
    {
        var original = block.KeptExperts;
        int e = original.Length, k = block.TopK;
        var tokens = new long[e];
        var reap = new double[e];
        var outputs = new List<Tensor>();
        long calibTokens = 0;
        var device = hidden[0].device;
        using var gram = torch.zeros(e, e, ScalarType.Float64, device);
        foreach (var h in hidden)
        {
            using var scope = NewDisposeScope();
            long n = h.numel() / h.shape[^1];
            calibTokens += n;
            var slots = new SlotContributions(n * k, h.shape[^1], h.dtype, h.device);
            block.Route(h, r =>
            {
                var f = slots.Add(block, r);
                tokens[r.Expert] += r.Slots.shape[0];
                reap[r.Expert] += (r.Weights * f.square().sum(1).sqrt()).sum(type: ScalarType.Float64).item<double>();
            });
            slots.AddPairs(gram, k);
            outputs.Add(slots.Sum(k).DetachFromDisposeScope());
        }
        var scores = new double[e];
        var why = new string[e];
        int keep = opt.KeepFor(e);
        long[] keptPositions;
        switch (opt.Criterion)
        {
            case ExpertCriterion.Frequency:
                for (int i = 0; i < e; i++) { scores[i] = tokens[i]; why[i] = $"{tokens[i]} routed tokens"; }
                keptPositions = Top(scores, keep);
                break;
            case ExpertCriterion.Reap:
                for (int i = 0; i < e; i++)
                {
                    scores[i] = tokens[i] > 0 ? reap[i] / tokens[i] : 0;
                    why[i] = $"REAP saliency {scores[i]:G4} (mean router weight × output norm over {tokens[i]} tokens)";
                }
                keptPositions = Top(scores, keep);
                break;
            default:
                keptPositions = BackwardElimination(gram, keep, damp, scores, why);
                break;
        }
        if (forced is not null)
        {
            var pos = forced.Select(x => Array.IndexOf(original, x)).ToArray();
            if (pos.Any(p => p < 0) || pos.Length != keep) throw new InvalidOperationException($"{name}: the planned experts do not match the block's");
            keptPositions = pos.Order().Select(x => (long)x).ToArray();
        }
        block.KeepExperts(keptPositions);
        return new ExpertRemoval(block, opt, damp, name, original, tokens, scores, why, keptPositions, outputs, calibTokens);
    }

    /// <summary>The <paramref name="keep"/> highest scores' positions, ascending (ties: the lower index).</summary>
    static long[] Top(double[] scores, int keep) =>
        Enumerable.Range(0, scores.Length).OrderByDescending(i => scores[i]).ThenBy(i => i).Take(keep).Select(i => (long)i).Order().ToArray();

    /// <summary>
    /// The layer's output y = Σ_e c_e regressed on the contributions: repeatedly drop the expert whose removal raises the
    /// residual least (β_e² / [G⁻¹]_ee, the least squares of the rest refitted), until <paramref name="keep"/> remain.
    /// Scores: the rise when it was dropped (kept experts: the rise their removal would cause at the end), as a fraction of ‖y‖².
    /// </summary>
    static long[] BackwardElimination(Tensor gram, int keep, double damp, double[] scores, string[] why)
    {
        using var scope = NewDisposeScope();
        int e = (int)gram.shape[0];
        var g = gram.cpu();
        var b = g.sum(1);
        double energy = Math.Max(b.sum().item<double>(), double.Epsilon);
        double lambda = damp * Math.Max(g.diagonal().mean().item<double>(), double.Epsilon);
        var active = Enumerable.Range(0, e).ToList();
        double[] Rises()
        {
            using var s = NewDisposeScope();
            var idx = torch.tensor(active.Select(i => (long)i).ToArray());
            var a = g.index_select(0, idx).index_select(1, idx) + torch.eye(active.Count, dtype: ScalarType.Float64) * lambda;
            var inv = torch.linalg.inv(a);
            var beta = inv.mv(b.index_select(0, idx));
            return (beta.square() / inv.diagonal()).data<double>().ToArray();
        }
        while (active.Count > keep)
        {
            var rise = Rises();
            int at = Enumerable.Range(0, active.Count).OrderBy(i => rise[i]).ThenBy(i => active[i]).First();
            int expert = active[at];
            scores[expert] = rise[at] / energy;
            why[expert] = $"removing it leaves {scores[expert]:P3} of the layer's output energy unexplained by the experts left";
            active.RemoveAt(at);
        }
        var last = Rises();
        for (int i = 0; i < active.Count; i++)
        {
            scores[active[i]] = last[i] / energy;
            why[active[i]] = $"removing it would leave {scores[active[i]]:P3} of the layer's output energy unexplained";
        }
        return active.Select(i => (long)i).ToArray();
    }

    /// <summary>
    /// Pass 2 on micro-batch <paramref name="index"/> (the same stream as pass 1): routes through the reduced block,
    /// hands every routed batch to <paramref name="also"/> (the engine's neuron Grams) and accumulates the fold.
    /// </summary>
    public void Observe(int index, Tensor hidden, Action<RoutedBatch> also)
    {
        using var scope = NewDisposeScope();
        int k = _block.TopK, kept = _keptPositions.Length;
        _foldGram ??= torch.zeros(kept, kept, ScalarType.Float64, hidden.device).DetachFromDisposeScope();
        _foldB ??= torch.zeros(kept, ScalarType.Float64, hidden.device).DetachFromDisposeScope();
        long n = hidden.numel() / hidden.shape[^1];
        var slots = new SlotContributions(n * k, hidden.shape[^1], hidden.dtype, hidden.device);
        _block.Route(hidden, r =>
        {
            also(r);
            slots.Add(_block, r);
        });
        slots.AddPairs(_foldGram, k);
        var y = _outputs[index];
        var r = y - slots.Sum(k);
        // ⟨u_slot, r_token⟩ for every slot (in the compute dtype, summed in float64 per expert).
        var dots = (slots.C.view(n, k, -1) * r.unsqueeze(1)).sum(2).reshape(-1).to(ScalarType.Float64);
        _foldB.index_add_(0, slots.Expert, dots, 1);
        _residual += r.square().sum(type: ScalarType.Float64).item<double>();
        _energy += y.square().sum(type: ScalarType.Float64).item<double>();
    }

    /// <summary>Solves and applies the fold (scales into the kept experts' down_proj), and reports the layer.</summary>
    /// <param name="tokensAfter">Tokens per kept expert in pass 2.</param>
    public MixtureReport Finish(long[] tokensAfter, IReadOnlyList<(long Expert, long Tokens, string Handled)> fewTokens)
    {
        int kept = _keptPositions.Length;
        var scales = Enumerable.Repeat(1.0, kept).ToArray();
        double folded = _residual;
        if (_opt.Fold == ExpertFold.Scale && _foldGram is not null && _energy > 0)
        {
            using var scope = NewDisposeScope();
            var g = _foldGram.cpu();
            var b = _foldB!.cpu();
            double lambda = _damp * Math.Max(g.diagonal().mean().item<double>(), double.Epsilon);
            var delta = torch.linalg.solve(g + torch.eye(kept, dtype: ScalarType.Float64) * lambda, b);
            // ‖r − Σ δ_k u_k‖² = ‖r‖² − 2 δᵀb + δᵀGδ (undamped G: the error the calibration tokens see).
            folded = _residual - 2 * delta.dot(b).item<double>() + delta.dot(g.mv(delta)).item<double>();
            var d = delta.data<double>().ToArray();
            for (int i = 0; i < kept; i++)
            {
                scales[i] = 1 + d[i];
                int layer = _block.ExpertLayer(i);
                var (w, c) = _block.Consumer(layer);
                var units = Enumerable.Range(0, (int)w.shape[1]).Select(u => (long)u).ToArray();
                _block.Prune(layer, units, w * scales[i], c is null ? null : c * scales[i]);
            }
        }
        var keptSet = _keptPositions.ToHashSet();
        var records = _original.Select((orig, p) =>
        {
            int at = Array.IndexOf(_keptPositions, (long)p);
            return new ExpertRecord(orig, _tokens[p], at >= 0 ? tokensAfter[at] : 0, _scores[p], keptSet.Contains(p), at >= 0 ? scales[at] : 0, keptSet.Contains(p) ? null : _why[p]);
        }).ToList();
        return new MixtureReport
        {
            Name = _name, Experts = _original.Length, TopK = _block.TopK, Kept = KeptExperts, Records = records, Tokens = _calibTokens,
            Criterion = ExpertOptions.Name(_opt.Criterion), Fold = ExpertOptions.Name(_opt.Fold),
            RelativeErrorRemoved = _energy > 0 ? _residual / _energy : 0,
            RelativeErrorFolded = _energy > 0 ? Math.Max(0, folded) / _energy : 0,
            FewTokens = fewTokens,
        };
    }

    public void Dispose()
    {
        foreach (var t in _outputs) t.Dispose();
        _outputs.Clear();
        _foldGram?.Dispose();
        _foldB?.Dispose();
    }
}
