using LlmSnp.Models;
using System.Diagnostics;
using static TorchSharp.torch;

namespace LlmSnp.Pruning;

/// <summary>What happened to one node layer.</summary>
public sealed record NodeLayerReport
{
    public required string Name { get; init; }
    public required string Kind { get; init; }
    public required int Units { get; init; }
    public required int GroupSize { get; init; }
    public required int UnitsKept { get; init; }
    /// <summary>Kept original indices: neurons, or heads for a head layer.</summary>
    public required long[] KeptIndices { get; init; }
    public required double Error { get; init; }
    public required double RelativeError { get; init; }
    public required double Lambda { get; init; }
    public required int DampingEscalations { get; init; }
    public required long ParamsRemoved { get; init; }
    /// <summary>Whether the reconstruction solved with the constant unit (a centred fit that sets the consumer's bias).</summary>
    public required bool Constant { get; init; }
    /// <summary>The reconstruction used (the requested one, or lstsq-nobias where the consumer cannot gain a bias).</summary>
    public required string Reconstruct { get; init; }
    /// <summary>Why the bias-free reconstruction replaced a requested one with the mean term; null where it did not.</summary>
    public string? BiasFreeBecause { get; init; }
    /// <summary>Why the layer was left whole without statistics (an expert with too few calibration tokens); null otherwise.</summary>
    public string? KeptWholeBecause { get; init; }
    /// <summary>Kept unit indices (a head's units expanded), ascending.</summary>
    [System.Text.Json.Serialization.JsonIgnore] public long[] KeptUnits { get; init; } = Array.Empty<long>();
}

public sealed record PruneResult
{
    public required IReadOnlyList<NodeLayerReport> Layers { get; init; }
    /// <summary>Per block: what each node layer kept (original group indices) and which consumers have a bias.</summary>
    public required IReadOnlyList<KeptBlock> Kept { get; init; }
    public double? Tau { get; init; }
    /// <summary>With equal widths (--uniform): the groups every layer keeps, per node kind pruned.</summary>
    public IReadOnlyDictionary<NodeKind, int>? UniformKept { get; init; }
    public long PrunableParams { get; init; }
    public long ParamsRemoved { get; init; }
    public double StatisticsSeconds { get; init; }
    public double DecompositionSeconds { get; init; }
    public double PlanSeconds { get; init; }
    /// <summary>Per sparse layer of a mixture: tokens per expert, the experts removed and why, the fold and its errors.</summary>
    public IReadOnlyList<MixtureReport> Mixtures { get; init; } = Array.Empty<MixtureReport>();
}

/// <summary>
/// The SNP engine (snp.md §1): blocks first to last, one resident at a time; inside a block, sub-block by
/// sub-block (the heads, then the MLP — or the experts, which share one input), each node layer pruned from
/// statistics of the activations the already-pruned model produces. For each node layer: collect its Gram,
/// choose what to keep, reconstruct its consumer, advance the calibration stream. It knows node layers and
/// consumers, never the model family.
/// </summary>
public sealed partial class SnpEngine
{
    readonly IPrunableModel _model;
    readonly PruneOptions _opt;
    readonly Action<string>? _log;

    public SnpEngine(IPrunableModel model, PruneOptions options, Action<string>? log = null)
    {
        _model = model; _opt = options; _log = log;
        options.Validate();
    }

    /// <summary>What one run accumulates; the engine itself keeps no state between runs.</summary>
    sealed class RunState
    {
        /// <summary>Calibration tokens (rows of every dense node layer's statistics).</summary>
        public long Tokens;
        public readonly List<NodeLayerReport> Reports = new();
        public readonly Dictionary<string, long> ParamsPerGroup = new();
        /// <summary>With equal widths: the group count of the first layer of each kind, that every later one must match.</summary>
        public readonly Dictionary<NodeKind, (int Groups, string Layer)> UniformGroups = new();
        public readonly Stopwatch Statistics = new(), Decomposition = new();
        /// <summary>The block being pruned.</summary>
        public int Block;
        /// <summary>Mixtures: what each sparse layer did, and the experts it kept (block → original indices).</summary>
        public readonly List<MixtureReport> Mixtures = new();
        public readonly Dictionary<int, long[]> ExpertChoices = new();
        /// <summary>Experts a budget plan chose (the pruning pass keeps the same ones); null: choose per layer.</summary>
        public IReadOnlyDictionary<int, long[]>? ExpertPlan;
    }

    /// <summary>How a node layer's statistics are used: pruned (the kept units come back), or measured only (budget plan).</summary>
    delegate long[] UseStatistics(int layer, NodeLayerInfo info, Tensor gram);

    /// <summary>
    /// Prunes with the calibration inputs (micro-batches for <see cref="IPrunableModel.Embed"/>);
    /// <paramref name="onBlockDone"/> receives each pruned block before it is released.
    /// </summary>
    public PruneResult Run(IReadOnlyList<Tensor> calibration, Action<IPrunableBlock, int> onBlockDone)
    {
        var planTime = Stopwatch.StartNew();
        double? tau = _opt.Policy == RatioPolicyKind.Variance ? _opt.Amount : null;
        int[][]? planned = null;
        IReadOnlyDictionary<int, long[]>? expertPlan = null;
        if (_opt.Policy == RatioPolicyKind.Budget) (tau, planned, expertPlan) = PlanBudget(calibration);
        double planSeconds = planned is null ? 0 : planTime.Elapsed.TotalSeconds;

        var run = new RunState { ExpertPlan = expertPlan };
        var total = Stopwatch.StartNew();
        var keptBlocks = new List<KeptBlock>();
        var hidden = calibration.Select(_model.Embed).ToList();
        run.Tokens = hidden.Sum(h => h.shape[0] * h.shape[1]);
        for (int b = 0; b < _model.BlockCount; b++)
        {
            using var block = _model.LoadBlock(b);
            int[]? plan = planned?[b];
            run.Block = b;
            ForEachSubBlock(run, block, hidden, (j, info, gram) => PruneLayer(run, block, j, info, gram, plan?[j]));
            var layers = block.NodeLayers;
            var kept = new KeptBlock(b, layers.Select((_, j) => block.KeptGroups(j)).ToArray(), layers.Select((_, j) => block.Consumer(j).Bias is not null).ToArray())
            {
                Experts = block is IMixtureBlock { ExpertSubBlock: not null } m ? m.KeptExperts : null,
            };
            keptBlocks.Add(kept);
            onBlockDone(block, b);
            double el = total.Elapsed.TotalSeconds, eta = el / (b + 1) * (_model.BlockCount - b - 1);
            _log?.Invoke($"block {b + 1}/{_model.BlockCount}: kept {KeptSummary(layers.Select((l, j) => $"{NodeKinds.Name(l.Kind)} {kept.Groups[j].Length}/{l.Groups}"))}; elapsed {el:F1}s, ETA {eta:F1}s");
        }
        hidden.ForEach(h => h.Dispose());
        var reports = run.Reports;
        return new PruneResult
        {
            Layers = reports, Kept = keptBlocks, Tau = tau,
            UniformKept = _opt.UniformWidths ? reports.GroupBy(r => NodeKinds.Parse(r.Kind, "kind"))
                .ToDictionary(g => g.Key, g => g.First().UnitsKept / g.First().GroupSize) : null,
            PrunableParams = reports.Sum(r => (long)(r.Units / r.GroupSize) * run.ParamsPerGroup[r.Name]),
            ParamsRemoved = reports.Sum(r => r.ParamsRemoved),
            StatisticsSeconds = run.Statistics.Elapsed.TotalSeconds, DecompositionSeconds = run.Decomposition.Elapsed.TotalSeconds,
            PlanSeconds = planSeconds,
            Mixtures = run.Mixtures,
        };
    }

    /// <summary>
    /// Moves every hidden micro-batch through the block, sub-block by sub-block; for each targeted node layer the
    /// statistics over all micro-batches go to <paramref name="use"/> first (which may prune the layer).
    /// </summary>
    void ForEachSubBlock(RunState run, IPrunableBlock block, List<Tensor> hidden, UseStatistics use)
    {
        var infos = block.NodeLayers;
        var subBlocks = block.SubBlocks;
        for (int s = 0; s < subBlocks.Count; s++)
        {
            var targeted = subBlocks[s].Where(j => _opt.Prunes(infos[j].Kind)).ToArray();
            if (block is IMixtureBlock m && m.ExpertSubBlock == s) MixtureLayers(run, m, s, hidden, use);
            else if (subBlocks[s].Length == 1) ChainLayer(run, block, subBlocks[s][0], infos[subBlocks[s][0]], hidden, targeted.Length == 1 ? use : null);
            else ParallelLayers(run, block, s, targeted, infos, hidden, use);
        }
    }

    /// <summary>
    /// A node layer alone in its sub-block. Activations no wider than the hidden state are kept from the statistics
    /// pass: the kept units' activations do not change when the layer is pruned (only their consumer does), so the
    /// producer runs once, not twice. Wider ones (the MLP) are recomputed by the pruned block instead of held in memory.
    /// </summary>
    void ChainLayer(RunState run, IPrunableBlock block, int j, NodeLayerInfo info, List<Tensor> hidden, UseStatistics? use)
    {
        List<Tensor>? reuse = null;
        if (use != null)
        {
            run.Statistics.Start();
            bool keep = info.Units <= hidden[0].shape[^1];
            if (keep) reuse = new List<Tensor>(hidden.Count);
            using var acc = new GramAccumulator(info.Units, _model.Device);
            foreach (var h in hidden)
            {
                var a = block.Activations(j, h);
                using (var flat = a.reshape(-1, info.Units)) acc.Add(flat);
                if (keep) reuse!.Add(a); else a.Dispose();
            }
            var keptUnits = Decompose(run, acc, j, info, use);
            run.Statistics.Start();
            if (reuse != null && keptUnits.Length < info.Units)
            {
                using var idx = torch.tensor(keptUnits, device: _model.Device);
                for (int k = 0; k < reuse.Count; k++)
                {
                    var sel = reuse[k].index_select(2, idx);
                    reuse[k].Dispose();
                    reuse[k] = sel;
                }
            }
        }
        else run.Statistics.Start();
        for (int k = 0; k < hidden.Count; k++)
        {
            using var a = reuse?[k] ?? block.Activations(j, hidden[k]);
            var next = block.Residual(j, hidden[k], a);
            hidden[k].Dispose();
            hidden[k] = next;
        }
        run.Statistics.Stop();
    }

    /// <summary>Node layers that read one input in parallel (experts): statistics of all of them, each layer pruned, then the stream advanced.</summary>
    void ParallelLayers(RunState run, IPrunableBlock block, int s, int[] targeted, IReadOnlyList<NodeLayerInfo> infos, List<Tensor> hidden, UseStatistics use)
    {
        run.Statistics.Start();
        if (targeted.Length > 0)
        {
            var accs = targeted.ToDictionary(j => j, j => new GramAccumulator(infos[j].Units, _model.Device));
            try
            {
                foreach (var h in hidden)
                    block.Collect(s, h, (j, a, w) => { if (accs.TryGetValue(j, out var acc)) acc.Add(a, w); });
                foreach (var j in targeted)
                {
                    Decompose(run, accs[j], j, infos[j], use);
                    run.Statistics.Start();
                }
            }
            finally { foreach (var acc in accs.Values) acc.Dispose(); }
        }
        for (int k = 0; k < hidden.Count; k++)
        {
            var next = block.Advance(s, hidden[k]);
            hidden[k].Dispose();
            hidden[k] = next;
        }
        run.Statistics.Stop();
    }

    /// <summary>The layer's Gram handed to <paramref name="use"/>, timed as decomposition; returns the kept units.</summary>
    static long[] Decompose(RunState run, GramAccumulator acc, int j, NodeLayerInfo info, UseStatistics use)
    {
        run.Statistics.Stop();
        run.Decomposition.Start();
        try
        {
            // use may release the Gram early (the reconstruction does, before factoring G_KK).
            using var gram = acc.Result(info.Name);
            return use(j, info, gram);
        }
        finally { run.Decomposition.Stop(); }
    }

    /// <summary>Orders the layer's groups, keeps what the policy says, reconstructs the consumer and prunes the block; returns the kept units.</summary>
    long[] PruneLayer(RunState run, IPrunableBlock block, int j, NodeLayerInfo info, Tensor gram, int? plannedGroups)
    {
        using var scope = NewDisposeScope();
        run.ParamsPerGroup[info.Name] = info.ParamsPerGroup;
        var (w, c) = block.Consumer(j);
        if (_opt.UniformWidths)
        {
            // Equal kept counts give equal widths only from equal widths (a re-prune of a per-layer prune does not qualify).
            if (!run.UniformGroups.TryGetValue(info.Kind, out var first)) run.UniformGroups[info.Kind] = (info.Groups, info.Name);
            else if (first.Groups != info.Groups)
                throw new LlmSnpException($"--uniform: {info.Name} has {info.Groups} groups but {first.Layer} has {first.Groups}; the source's widths differ across layers");
        }
        var groupOrder = OrderGroups(run, block, j, info, gram, w, c);
        int gs = info.GroupSize;
        int keepGroups = plannedGroups ?? _opt.Policy switch
        {
            RatioPolicyKind.Ratio => RatioPolicy.KeepForRatio(info.Groups, _opt.Amount),
            _ => RatioPolicy.KeepForVariance(Subspace.GroupResiduals(gram, Units(groupOrder, gs), gs, _opt.Damp, info.Name), _opt.Amount),
        };
        if (NodeKinds.IsNeurons(info.Kind)) keepGroups = RatioPolicy.RoundToMultiple(keepGroups, info.Groups, _opt.WidthMultiple);
        var keptGroups = groupOrder.Take(keepGroups).OrderBy(x => x).ToArray();
        var prunedGroups = groupOrder.Skip(keepGroups).OrderBy(x => x).ToArray();
        var keptUnits = Units(keptGroups, gs);
        var prunedUnits = Units(prunedGroups, gs);
        // A mean term needs a bias on the consumer; where the family's stock class has no parameter for one, the
        // bias-free least squares is used instead, so that the written checkpoint still loads there.
        var mode = _opt.Reconstruct;
        string? biasFree = null;
        if (c is null && (mode == ReconstructMode.Lstsq || Subspace.UsesConstant(mode, consumerHasBias: false)))
        {
            // `lstsq` takes the mean term wherever a bias can hold it: on stories260K it beat the bias-free fit at
            // every ratio (eval/results/stories260k), so a Llama consumer gains a bias its stock class loads.
            if (block.CanAddConsumerBias(j, out var why)) { if (mode == ReconstructMode.Lstsq) mode = ReconstructMode.LstsqBias; }
            else
            {
                mode = ReconstructMode.LstsqNoBias;
                biasFree = why;
            }
        }
        var rec = Subspace.Reconstruct(gram, w, c, keptUnits, prunedUnits, mode, _opt.Damp, info.Name, releaseGram: true);
        block.Prune(j, keptUnits, rec.Weight, rec.Bias);
        if (rec.Damping.Escalations > 0)
            _log?.Invoke($"{info.Name}: Gram ill-conditioned, damping raised {rec.Damping.Escalations}× to λ = {rec.Damping.Lambda:G3}");
        run.Reports.Add(new NodeLayerReport
        {
            Name = info.Name, Kind = NodeKinds.Name(info.Kind), Units = info.Units, GroupSize = gs,
            UnitsKept = keptUnits.Length, KeptIndices = gs == 1 ? keptUnits : keptGroups,
            Error = rec.Error, RelativeError = rec.RelativeError, Lambda = rec.Damping.Lambda,
            DampingEscalations = rec.Damping.Escalations, ParamsRemoved = prunedGroups.Length * info.ParamsPerGroup,
            Constant = rec.Constant, KeptUnits = keptUnits,
            Reconstruct = ReconstructModes.Name(mode), BiasFreeBecause = biasFree,
        });
        return keptUnits;
    }

    long[] OrderGroups(RunState run, IPrunableBlock block, int j, NodeLayerInfo info, Tensor gram, Tensor w, Tensor? c)
    {
        using var norms = block.ProducerSquaredNorms(j);
        // A consumer without a bias is one whose bias is zero (obs keeps the constant column either way).
        using var bias = c is null ? torch.zeros(w.shape[0], w.dtype, w.device) : null;
        var input = new OrderingInput(gram, w, c ?? bias!, norms, info.GroupSize, run.Tokens, _opt.Damp, HashSeed(_opt.Seed, info.Name), info.Name);
        return Orderings.Order(_opt.Ordering, input);
    }

    /// <summary>Equal consecutive entries once, with their count (a mixture's 128 experts are one entry, not 128).</summary>
    static string KeptSummary(IEnumerable<string> entries)
    {
        var runs = new List<(string Entry, int Count)>();
        foreach (var e in entries)
            if (runs.Count > 0 && runs[^1].Entry == e) runs[^1] = (e, runs[^1].Count + 1);
            else runs.Add((e, 1));
        return string.Join(", ", runs.Select(r => r.Count == 1 ? r.Entry : $"{r.Entry} ×{r.Count}"));
    }

    /// <summary>A seed per layer that does not depend on .NET's randomised string hashing.</summary>
    static int HashSeed(int seed, string name)
    {
        unchecked
        {
            int h = seed * 31 + 17;
            foreach (char ch in name) h = h * 31 + ch;
            return h & int.MaxValue;
        }
    }

    static long[] Units(long[] groups, int gs) =>
        groups.SelectMany(g => Enumerable.Range(0, gs).Select(u => g * gs + u)).ToArray();

    /// <summary>
    /// Budget policy, first pass: dense statistics of every targeted node layer, D per group in the
    /// ordering, then τ by bisection on the parameter budget (snp.md §6).
    /// </summary>
    (double? Tau, int[][] Keep, IReadOnlyDictionary<int, long[]> Experts) PlanBudget(IReadOnlyList<Tensor> calibration)
    {
        var layers = new List<(double[] D, long ParamsPerGroup, NodeKind Kind)>();
        var where = new List<(int Block, int Layer)>();
        var groupsPerLayer = new List<int[]>();
        var run = new RunState();
        var hidden = calibration.Select(_model.Embed).ToList();
        run.Tokens = hidden.Sum(h => h.shape[0] * h.shape[1]);
        for (int b = 0; b < _model.BlockCount; b++)
        {
            using var block = _model.LoadBlock(b);
            run.Block = b;
            int blockIndex = b;
            ForEachSubBlock(run, block, hidden, (j, info, gram) =>
            {
                var (w, c) = block.Consumer(j);
                var order = OrderGroups(run, block, j, info, gram, w, c);
                layers.Add((Subspace.GroupResiduals(gram, Units(order, info.GroupSize), info.GroupSize, _opt.Damp, info.Name), info.ParamsPerGroup, info.Kind));
                where.Add((blockIndex, j));
                return Enumerable.Range(0, info.Units).Select(u => (long)u).ToArray();   // dense pass: nothing pruned
            });
            // After the sub-blocks: a mixture has dropped the experts it does not keep (the plan indexes the kept ones).
            groupsPerLayer.Add(block.NodeLayers.Select(i => i.Groups).ToArray());
            _log?.Invoke($"budget plan: statistics of block {b + 1}/{_model.BlockCount}");
        }
        hidden.ForEach(h => h.Dispose());
        double? tau;
        int[] keep;
        if (_opt.UniformWidths)
        {
            var uniform = RatioPolicy.PlanUniformBudget(layers, _opt.Amount);
            (tau, keep) = (null, layers.Select(l => uniform[l.Kind]).ToArray());
            _log?.Invoke($"budget plan (uniform widths): keep {string.Join(", ", uniform.Select(kv => $"{NodeKinds.Name(kv.Key)} {kv.Value}"))} groups in every layer");
        }
        else
        {
            (var t, keep) = RatioPolicy.PlanBudget(layers.Select(l => (l.D, l.ParamsPerGroup)).ToList(), _opt.Amount);
            tau = t;
            _log?.Invoke($"budget plan: τ = {t:F6}");
        }
        var plan = groupsPerLayer.Select(g => g.ToArray()).ToArray();
        for (int i = 0; i < where.Count; i++) plan[where[i].Block][where[i].Layer] = keep[i];
        return (tau, plan, run.ExpertChoices);
    }
}
