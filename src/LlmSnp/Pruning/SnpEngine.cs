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
}

/// <summary>
/// The SNP engine (snp.md §1): blocks first to last, one resident at a time; inside a block the
/// heads, then the MLP, each from statistics of the activations the already-pruned model produces.
/// It knows node layers and consumers, never the model family.
/// </summary>
public sealed class SnpEngine
{
    readonly IPrunableModel _model;
    readonly PruneOptions _opt;
    readonly Action<string>? _log;

    public SnpEngine(IPrunableModel model, PruneOptions options, Action<string>? log = null)
    {
        _model = model; _opt = options; _log = log;
        options.Validate();
    }

    /// <summary>
    /// Prunes with the calibration inputs (micro-batches for <see cref="IPrunableModel.Embed"/>);
    /// <paramref name="onBlockDone"/> receives each pruned block before it is released.
    /// </summary>
    public PruneResult Run(IReadOnlyList<Tensor> calibration, Action<IPrunableBlock, int> onBlockDone)
    {
        double planSeconds = 0;
        int[][]? planned = null;
        double? tau = _opt.Policy == RatioPolicyKind.Variance ? _opt.Amount : null;
        if (_opt.Policy == RatioPolicyKind.Budget)
        {
            var sw = Stopwatch.StartNew();
            (tau, planned) = PlanBudget(calibration);
            planSeconds = sw.Elapsed.TotalSeconds;
        }
        _uniformGroups.Clear();
        var total = Stopwatch.StartNew();
        double statSec = 0, decSec = 0;
        var reports = new List<NodeLayerReport>();
        var keptBlocks = new List<KeptBlock>();
        var hidden = calibration.Select(_model.Embed).ToList();
        _tokens = hidden.Sum(h => h.shape[0] * h.shape[1]);
        double decBefore = 0;
        for (int b = 0; b < _model.BlockCount; b++)
        {
            using var block = _model.LoadBlock(b);
            var layers = block.NodeLayers;
            for (int j = 0; j < layers.Count; j++)
            {
                var info = layers[j];
                Func<Tensor, long[]>? prune = null;
                if (_opt.Targets(info.Kind))
                    prune = gram =>
                    {
                        var s1 = Stopwatch.StartNew();
                        var report = PruneLayer(block, j, info, gram, planned?[b][j]);
                        decSec += s1.Elapsed.TotalSeconds;
                        reports.Add(report);
                        return report.KeptUnits;
                    };
                var s0 = Stopwatch.StartNew();
                RunSubBlock(block, j, info, hidden, prune);
                statSec += s0.Elapsed.TotalSeconds;
            }
            statSec -= decSec - decBefore;   // RunSubBlock's time includes the decomposition
            decBefore = decSec;
            var kept = new KeptBlock(layers.Select((_, j) => block.KeptGroups(j)).ToArray(), layers.Select((_, j) => block.Consumer(j).Bias is not null).ToArray());
            keptBlocks.Add(kept);
            onBlockDone(block, b);
            double el = total.Elapsed.TotalSeconds, eta = el / (b + 1) * (_model.BlockCount - b - 1);
            _log?.Invoke($"block {b + 1}/{_model.BlockCount}: kept {string.Join(", ", layers.Select((l, j) => $"{(l.Kind == NodeKind.Heads ? "heads" : "mlp")} {kept.Groups[j].Length}/{l.Groups}"))}; elapsed {el:F1}s, ETA {eta:F1}s");
        }
        hidden.ForEach(h => h.Dispose());
        long prunable = reports.Sum(r => (long)(r.Units / r.GroupSize) * _paramsPerGroup[r.Name]);
        return new PruneResult
        {
            Layers = reports, Kept = keptBlocks, Tau = tau,
            UniformKept = _opt.UniformWidths ? reports.GroupBy(r => r.Kind == "heads" ? NodeKind.Heads : NodeKind.Mlp)
                .ToDictionary(g => g.Key, g => g.First().UnitsKept / g.First().GroupSize) : null,
            PrunableParams = prunable, ParamsRemoved = reports.Sum(r => r.ParamsRemoved),
            StatisticsSeconds = statSec, DecompositionSeconds = decSec, PlanSeconds = planSeconds,
        };
    }

    readonly Dictionary<string, long> _paramsPerGroup = new();
    /// <summary>With equal widths: the group count of the first layer of each kind, that every later one must match.</summary>
    readonly Dictionary<NodeKind, (int Groups, string Layer)> _uniformGroups = new();
    long _tokens;

    /// <summary>
    /// Moves every hidden micro-batch through node layer <paramref name="j"/>'s sub-block. With
    /// <paramref name="prune"/>, first gathers the layer's Gram over all micro-batches and lets it
    /// prune the layer (it returns the kept units). Activations no wider than the hidden state are
    /// kept from the statistics pass: the kept units' activations do not change when the layer is
    /// pruned (only their consumer does), so the sub-block's producer runs once, not twice.
    /// Wider ones (the MLP) are recomputed by the pruned block instead of held in memory.
    /// </summary>
    void RunSubBlock(IPrunableBlock block, int j, NodeLayerInfo info, List<Tensor> hidden, Func<Tensor, long[]>? prune)
    {
        List<Tensor>? reuse = null;
        if (prune != null)
        {
            bool keep = info.Units <= hidden[0].shape[^1];
            if (keep) reuse = new List<Tensor>(hidden.Count);
            long[] keptUnits;
            using (var acc = new GramAccumulator(info.Units, _model.Device))
            {
                foreach (var h in hidden)
                {
                    var a = block.Activations(j, h);
                    using (var flat = a.reshape(-1, info.Units)) acc.Add(flat);
                    if (keep) reuse!.Add(a); else a.Dispose();
                }
                // prune may release the Gram early (the reconstruction does, before factoring G_KK).
                using var gram = acc.Result(info.Name);
                keptUnits = prune(gram);
            }
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
        for (int k = 0; k < hidden.Count; k++)
        {
            using var a = reuse?[k] ?? block.Activations(j, hidden[k]);
            var next = block.Residual(j, hidden[k], a);
            hidden[k].Dispose();
            hidden[k] = next;
        }
    }

    NodeLayerReport PruneLayer(IPrunableBlock block, int j, NodeLayerInfo info, Tensor gram, int? plannedGroups)
    {
        using var scope = NewDisposeScope();
        _paramsPerGroup[info.Name] = info.ParamsPerGroup;
        var (w, c) = block.Consumer(j);
        if (_opt.UniformWidths)
        {
            // Equal kept counts give equal widths only from equal widths (a re-prune of a per-layer prune does not qualify).
            if (!_uniformGroups.TryGetValue(info.Kind, out var first)) _uniformGroups[info.Kind] = (info.Groups, info.Name);
            else if (first.Groups != info.Groups)
                throw new LlmSnpException($"--uniform: {info.Name} has {info.Groups} groups but {first.Layer} has {first.Groups}; the source's widths differ across layers");
        }
        var groupOrder = OrderGroups(block, j, info, gram, w, c);
        int gs = info.GroupSize;
        int keepGroups = plannedGroups ?? _opt.Policy switch
        {
            RatioPolicyKind.Ratio => RatioPolicy.KeepForRatio(info.Groups, _opt.Amount),
            _ => RatioPolicy.KeepForVariance(Subspace.GroupResiduals(gram, Units(groupOrder, gs), gs, _opt.Damp, info.Name), _opt.Amount),
        };
        if (info.Kind == NodeKind.Mlp) keepGroups = RatioPolicy.RoundToMultiple(keepGroups, info.Groups, _opt.WidthMultiple);
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
        return new NodeLayerReport
        {
            Name = info.Name, Kind = info.Kind == NodeKind.Heads ? "heads" : "mlp", Units = info.Units, GroupSize = gs,
            UnitsKept = keptUnits.Length, KeptIndices = gs == 1 ? keptUnits : keptGroups,
            Error = rec.Error, RelativeError = rec.RelativeError, Lambda = rec.Damping.Lambda,
            DampingEscalations = rec.Damping.Escalations, ParamsRemoved = prunedGroups.Length * info.ParamsPerGroup,
            Constant = rec.Constant, KeptUnits = keptUnits,
            Reconstruct = ReconstructModes.Name(mode), BiasFreeBecause = biasFree,
        };
    }

    long[] OrderGroups(IPrunableBlock block, int j, NodeLayerInfo info, Tensor gram, Tensor w, Tensor? c)
    {
        using var norms = block.ProducerSquaredNorms(j);
        // A consumer without a bias is one whose bias is zero (obs keeps the constant column either way).
        using var bias = c is null ? torch.zeros(w.shape[0], w.dtype, w.device) : null;
        var input = new OrderingInput(gram, w, c ?? bias!, norms, info.GroupSize, _tokens, _opt.Damp, HashSeed(_opt.Seed, info.Name), info.Name);
        return Orderings.Order(_opt.Ordering, input);
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
    (double? Tau, int[][] Keep) PlanBudget(IReadOnlyList<Tensor> calibration)
    {
        var layers = new List<(double[] D, long ParamsPerGroup, NodeKind Kind)>();
        var where = new List<(int Block, int Layer)>();
        var groupsPerLayer = new List<int[]>();
        var hidden = calibration.Select(_model.Embed).ToList();
        _tokens = hidden.Sum(h => h.shape[0] * h.shape[1]);
        for (int b = 0; b < _model.BlockCount; b++)
        {
            using var block = _model.LoadBlock(b);
            var infos = block.NodeLayers;
            groupsPerLayer.Add(infos.Select(i => i.Groups).ToArray());
            for (int j = 0; j < infos.Count; j++)
            {
                var info = infos[j];
                Func<Tensor, long[]>? measure = null;
                if (_opt.Targets(info.Kind))
                    measure = gram =>
                    {
                        var (w, c) = block.Consumer(j);
                        var order = OrderGroups(block, j, info, gram, w, c);
                        layers.Add((Subspace.GroupResiduals(gram, Units(order, info.GroupSize), info.GroupSize, _opt.Damp, info.Name), info.ParamsPerGroup, info.Kind));
                        where.Add((b, j));
                        return Enumerable.Range(0, info.Units).Select(u => (long)u).ToArray();   // dense pass: nothing pruned
                    };
                RunSubBlock(block, j, info, hidden, measure);
            }
            _log?.Invoke($"budget plan: statistics of block {b + 1}/{_model.BlockCount}");
        }
        hidden.ForEach(h => h.Dispose());
        double? tau;
        int[] keep;
        if (_opt.UniformWidths)
        {
            var uniform = RatioPolicy.PlanUniformBudget(layers, _opt.Amount);
            (tau, keep) = (null, layers.Select(l => uniform[l.Kind]).ToArray());
            _log?.Invoke($"budget plan (uniform widths): keep {string.Join(", ", uniform.Select(kv => $"{(kv.Key == NodeKind.Heads ? "heads" : "mlp")} {kv.Value}"))} groups in every layer");
        }
        else
        {
            (var t, keep) = RatioPolicy.PlanBudget(layers.Select(l => (l.D, l.ParamsPerGroup)).ToList(), _opt.Amount);
            tau = t;
            _log?.Invoke($"budget plan: τ = {t:F6}");
        }
        var plan = groupsPerLayer.Select(g => g.ToArray()).ToArray();
        for (int i = 0; i < where.Count; i++) plan[where[i].Block][where[i].Layer] = keep[i];
        return (tau, plan);
    }
}
