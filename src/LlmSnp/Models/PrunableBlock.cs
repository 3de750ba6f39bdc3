using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>
/// A producer of a node layer: a weight whose rows (and a bias whose entries) belong to its units' groups. In a
/// fused tensor (Phi-3's qkv_proj, gate_up_proj) the producer owns one <paramref name="Segment"/> of the rows:
/// the block declares the segments, consecutive runs of rows, when it is built.
/// </summary>
public sealed record Producer(string Weight, string? Bias, int Segment = 0);

/// <summary>
/// Where a node layer's units lie in its block's tensors: each producer holds rows for every group
/// (rows ÷ groups of them per group, in group order: a K/V projection has one head's rows per group,
/// the query projection all the group's heads), and the consumer one column per unit.
/// </summary>
public sealed record UnitMap(string Name, NodeKind Kind, int GroupSize, IReadOnlyList<Producer> Producers, string ConsumerWeight, string ConsumerBias);

/// <summary>
/// The pruning surgery every family's block shares, on the block's tensors under their checkpoint
/// names: a family's block file holds only its forward (<see cref="Activations"/>, <see cref="Residual"/>)
/// and its <see cref="UnitMap"/>s. The consumer bias is optional (LLaMA has none) and is added when a
/// reconstruction gives one. Fused producers stay fused: their segments shrink in place.
/// </summary>
public abstract class PrunableBlock : IPrunableBlock
{
    /// <summary>The block's tensors by full checkpoint name, in the order they are written.</summary>
    protected readonly Dictionary<string, Tensor> W;
    readonly List<UnitMap> _maps;
    readonly List<int> _origGroups;
    readonly List<long[]> _keptGroups;   // original indices, per node layer

    /// <summary>A run of a pruned tensor's rows (or a consumer's columns) that one node layer owns (Layer −1: none).</summary>
    sealed class Segment
    {
        public int Layer = -1;
        public long PerGroup;
        public long OrigRows, Rows;
        public Segment Clone() => (Segment)MemberwiseClone();
    }

    /// <summary>Per pruned tensor: the dimension pruned and its segments in order.</summary>
    readonly Dictionary<string, (int Dim, Segment[] Segments)> _layout = new(StringComparer.Ordinal);

    /// <param name="tensors">Name → tensor (taken over: the block disposes them).</param>
    /// <param name="fused">Fused producer weights: name → the rows of each segment, in order (default: one segment).</param>
    protected PrunableBlock(Dictionary<string, Tensor> tensors, IReadOnlyList<UnitMap> maps, IReadOnlyDictionary<string, long[]>? fused = null)
    {
        W = tensors; _maps = maps.ToList();
        _origGroups = new List<int>(new int[maps.Count]);
        _keptGroups = new List<long[]>(new long[maps.Count][]);
        for (int j = 0; j < maps.Count; j++)
        {
            var m = maps[j];
            int units = (int)W[m.ConsumerWeight].shape[1];
            if (units % m.GroupSize != 0) throw new LlmSnpException($"{m.ConsumerWeight}: {units} columns is not a whole number of groups of {m.GroupSize}");
            int groups = units / m.GroupSize;
            _origGroups[j] = groups;
            _keptGroups[j] = Enumerable.Range(0, groups).Select(g => (long)g).ToArray();
            foreach (var p in m.Producers)
            {
                long[]? parts = fused != null && fused.TryGetValue(p.Weight, out var f) ? f : null;
                foreach (var name in new[] { p.Weight, p.Bias })
                {
                    if (name == null || !W.TryGetValue(name, out var t)) continue;
                    if (!_layout.TryGetValue(name, out var layout))
                    {
                        var rows = parts ?? new[] { t.shape[0] };
                        if (rows.Sum() != t.shape[0])
                            throw new LlmSnpException($"{name}: {t.shape[0]} rows, but its fused parts have {string.Join(" + ", rows)} = {rows.Sum()}");
                        layout = (0, rows.Select(r => new Segment { OrigRows = r, Rows = r }).ToArray());
                        _layout[name] = layout;
                    }
                    var seg = layout.Segments[p.Segment];
                    if (seg.Rows % groups != 0) throw new LlmSnpException($"{name}: {seg.Rows} rows do not split into {groups} groups");
                    seg.Layer = j;
                    seg.PerGroup = seg.Rows / groups;
                }
            }
            _layout[m.ConsumerWeight] = (1, new[] { new Segment { Layer = j, PerGroup = m.GroupSize, OrigRows = units, Rows = units } });
        }
    }

    /// <summary>The current rows of each segment of a fused tensor (the forward splits it by them).</summary>
    protected long[] SegmentRows(string name) => _layout[name].Segments.Select(s => s.Rows).ToArray();

    /// <summary>The producer's own rows (its segment of a fused tensor) of a weight or bias.</summary>
    Tensor Rows(string name, int segment)
    {
        var t = W[name];
        var segs = _layout[name].Segments;
        if (segs.Length == 1) return t;
        return t.narrow(0, segs.Take(segment).Sum(s => s.Rows), segs[segment].Rows);
    }

    /// <summary>Parameters one group of a node layer owns: its producer rows and biases, its consumer columns.</summary>
    long ParamsPerGroup(int j)
    {
        var m = _maps[j];
        int groups = Groups(j);
        long n = W[m.ConsumerWeight].shape[0] * m.GroupSize;
        foreach (var p in m.Producers)
        {
            n += Rows(p.Weight, p.Segment).numel() / groups;
            if (p.Bias != null && W.ContainsKey(p.Bias)) n += Rows(p.Bias, p.Segment).numel() / groups;
        }
        return n;
    }

    int Groups(int j) => (int)W[_maps[j].ConsumerWeight].shape[1] / _maps[j].GroupSize;

    public IReadOnlyList<NodeLayerInfo> NodeLayers =>
        _maps.Select((m, j) => new NodeLayerInfo(m.Name, m.Kind, (int)W[m.ConsumerWeight].shape[1], m.GroupSize, ParamsPerGroup(j))).ToArray();

    public abstract Tensor Activations(int layer, Tensor input);

    public abstract Tensor Residual(int layer, Tensor input, Tensor activations);

    /// <summary>
    /// The rest of an attention-then-MLP layer once the heads' outputs were computed another way (from a KV cache, or on
    /// packed rows): attention's residual, then the MLP's, as <see cref="Forward"/> chains them.
    /// </summary>
    protected Tensor AfterAttention(Tensor hidden, Tensor heads)
    {
        var h = Residual(0, hidden, heads);
        return Residual(1, h, Activations(1, h));
    }

    /// <summary>By default each node layer is its own sub-block, in a chain; a block with parallel node layers overrides these.</summary>
    public virtual IReadOnlyList<int[]> SubBlocks => _maps.Select((_, j) => new[] { j }).ToArray();

    public virtual void Collect(int subBlock, Tensor input, Action<int, Tensor, Tensor?> collect)
    {
        int j = SubBlocks[subBlock].Single();
        using var a = Activations(j, input);
        using var flat = a.reshape(-1, a.shape[^1]);
        collect(j, flat, null);
    }

    public virtual Tensor Advance(int subBlock, Tensor input)
    {
        using var scope = NewDisposeScope();
        int j = SubBlocks[subBlock].Single();
        return Residual(j, input, Activations(j, input)).MoveToOuterDisposeScope();
    }

    public Tensor? Forward(Tensor hidden, int captureLayer = -1, Action<Tensor>? capture = null)
    {
        using var scope = NewDisposeScope();
        var h = hidden;
        foreach (var (sub, s) in SubBlocks.Select((sub, s) => (sub, s)))
        {
            if (sub.Contains(captureLayer))
            {
                Collect(s, h, (j, a, _) => { if (j == captureLayer) capture!(a); });
                return null;
            }
            h = Advance(s, h);
        }
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>The tensor of that name, or null where the block has none (an absent bias).</summary>
    protected Tensor? Optional(string name) => W.TryGetValue(name, out var t) ? t : null;

    public (Tensor Weight, Tensor? Bias) Consumer(int layer) => (W[_maps[layer].ConsumerWeight], Optional(_maps[layer].ConsumerBias));

    public Tensor ProducerSquaredNorms(int layer)
    {
        using var scope = NewDisposeScope();
        var m = _maps[layer];
        int groups = Groups(layer);
        Tensor? r = null;
        foreach (var p in m.Producers)
        {
            var rows = Rows(p.Weight, p.Segment).square().sum(1);
            if (p.Bias != null && W.ContainsKey(p.Bias)) rows = rows + Rows(p.Bias, p.Segment).square();
            // A producer with fewer rows per group than units (a shared K/V head) spreads its norm evenly over the group's units.
            if (rows.shape[0] != groups * m.GroupSize)
                rows = rows.reshape(groups, -1).sum(1).div(m.GroupSize).repeat_interleave(m.GroupSize);
            r = r is null ? rows : r + rows;
        }
        return r!.MoveToOuterDisposeScope();
    }

    public void Prune(int layer, long[] keptUnits, Tensor consumerWeight, Tensor? consumerBias)
    {
        var m = _maps[layer];
        var reference = W[m.ConsumerWeight];
        var (device, dtype) = (reference.device, reference.dtype);
        int gs = m.GroupSize;
        var keptGroups = keptUnits.Where(u => u % gs == 0).Select(u => u / gs).ToArray();
        var names = m.Producers.SelectMany(p => new[] { p.Weight, p.Bias }).Where(n => n != null && W.ContainsKey(n)).Distinct().ToArray();
        foreach (var name in names)
        {
            // Each segment this layer owns keeps its kept groups' rows; other segments of a fused tensor stay whole.
            var rows = new List<long>();
            long offset = 0;
            foreach (var seg in _layout[name!].Segments)
            {
                long before = seg.Rows;
                if (seg.Layer == layer)
                {
                    // Rows of the kept groups; for one row per unit these are the kept units themselves.
                    var own = seg.PerGroup == gs ? keptUnits : Rows(keptGroups, seg.PerGroup);
                    rows.AddRange(own.Select(r => offset + r));
                    seg.Rows = own.Length;
                }
                else rows.AddRange(Enumerable.Range(0, (int)before).Select(r => offset + r));
                offset += before;
            }
            using var idx = torch.tensor(rows.ToArray(), device: device);
            Replace(name!, W[name!].index_select(0, idx));
        }
        Replace(m.ConsumerWeight, consumerWeight.to(dtype, device));
        _layout[m.ConsumerWeight].Segments[0].Rows = keptUnits.Length;
        if (consumerBias is not null)
        {
            if (!W.ContainsKey(m.ConsumerBias))
            {
                // The engine asks first; reaching here would write a tensor the stock class rejects.
                if (!CanAddConsumerBias(layer, out var why)) throw new InvalidOperationException($"{m.ConsumerBias}: {why}");
                OnConsumerBiasAdded(layer);
            }
            Replace(m.ConsumerBias, consumerBias.to(dtype, device));
        }
        _keptGroups[layer] = keptGroups.Select(g => _keptGroups[layer][g]).ToArray();
    }

    /// <summary>
    /// Removes whole node layers (the experts a mixture drops) with the tensors only they own; later node layers move
    /// down. A removed layer's producers and consumer must not be shared with a kept one.
    /// </summary>
    protected void RemoveNodeLayers(IReadOnlyCollection<int> layers, IEnumerable<string> tensors)
    {
        var gone = layers.ToHashSet();
        var renumber = new int[_maps.Count];
        for (int j = 0, next = 0; j < _maps.Count; j++) renumber[j] = gone.Contains(j) ? -1 : next++;
        foreach (var name in tensors)
        {
            if (W.Remove(name, out var t)) t.Dispose();
            _layout.Remove(name);
        }
        foreach (var (name, at) in _layout)
            foreach (var seg in at.Segments)
                if (seg.Layer >= 0)
                    seg.Layer = renumber[seg.Layer] >= 0 ? renumber[seg.Layer] : throw new InvalidOperationException($"{name}: owned by a removed node layer but still in the block");
        foreach (int j in gone.OrderByDescending(j => j))
        {
            _maps.RemoveAt(j);
            _origGroups.RemoveAt(j);
            _keptGroups.RemoveAt(j);
        }
    }

    /// <summary>By default a consumer may gain a bias (OPT and ViT consumers have one already).</summary>
    public virtual bool CanAddConsumerBias(int layer, out string reason)
    {
        reason = "";
        return true;
    }

    /// <summary>A family whose config flags a bias for a set of tensors at once adds the others here (zero).</summary>
    protected virtual void OnConsumerBiasAdded(int layer) { }

    protected void AddZeroBias(string weightName, string biasName)
    {
        if (W.ContainsKey(biasName)) return;
        var w = W[weightName];
        W[biasName] = torch.zeros(w.shape[0], w.dtype, w.device).DetachFromDisposeScope();
        if (_layout.TryGetValue(weightName, out var at)) _layout[biasName] = (at.Dim, at.Segments.Select(x => x.Clone()).ToArray());
    }

    public long[] KeptGroups(int layer) => _keptGroups[layer];

    static long[] Rows(long[] groups, long perGroup) =>
        groups.SelectMany(g => Enumerable.Range(0, (int)perGroup).Select(r => g * perGroup + r)).ToArray();

    void Replace(string name, Tensor t)
    {
        var old = Optional(name);
        W[name] = t.contiguous().DetachFromDisposeScope();
        if (old is not null && !ReferenceEquals(old, W[name])) old.Dispose();
    }

    /// <summary>The family's checkpoint names for the block's tensors (a layout that fuses tensors overrides this).</summary>
    protected virtual IEnumerable<(string Name, Tensor Tensor)> ToCheckpoint(IReadOnlyDictionary<string, Tensor> tensors) =>
        tensors.Select(kv => (kv.Key, kv.Value));

    public IEnumerable<(string Name, Tensor Tensor)> Tensors(ScalarType dtype) =>
        ToCheckpoint(W.ToDictionary(kv => kv.Key, kv => kv.Value.to(dtype)));

    public IEnumerable<(string Name, Tensor Tensor)> PaddedTensors(ScalarType dtype)
    {
        var padded = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var (name, t) in W)
        {
            Tensor p = t;
            if (_layout.TryGetValue(name, out var at))
            {
                // Kept rows at their original places, segment by segment.
                var kept = new List<long>();
                long offset = 0;
                foreach (var seg in at.Segments)
                {
                    kept.AddRange(seg.Layer >= 0 ? Rows(_keptGroups[seg.Layer], seg.PerGroup).Select(r => offset + r)
                        : Enumerable.Range(0, (int)seg.OrigRows).Select(r => offset + (long)r));
                    offset += seg.Layer >= 0 ? _origGroups[seg.Layer] * seg.PerGroup : seg.OrigRows;
                }
                p = ZeroPad(t, at.Dim, offset, kept.ToArray());
            }
            padded[name] = p.to(dtype);
        }
        return ToCheckpoint(padded);
    }

    static Tensor ZeroPad(Tensor t, int dim, long full, long[] kept)
    {
        var shape = t.shape.ToArray();
        shape[dim] = full;
        var z = torch.zeros(shape, t.dtype, t.device);
        using var idx = torch.tensor(kept, device: t.device);
        return z.index_copy_(dim, idx, t);
    }

    /// <summary>Reads a block's tensors; on failure releases whatever was already read.</summary>
    public static Dictionary<string, Tensor> ReadAll(Action<Dictionary<string, Tensor>> fill)
    {
        var w = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        try
        {
            fill(w);
            return w;
        }
        catch
        {
            foreach (var t in w.Values) t.Dispose();
            throw;
        }
    }

    /// <summary>Where <see cref="Recycle"/> hands the block's tensors (the reader they came from); null: they are disposed.</summary>
    public Action<IEnumerable<Tensor>>? Recycler { get; init; }

    public void Recycle()
    {
        if (Recycler is null) { Dispose(); return; }
        Recycler(W.Values);
        W.Clear();
    }

    public void Dispose()
    {
        foreach (var t in W.Values) t.Dispose();
        W.Clear();
        Recycler?.Invoke(Array.Empty<Tensor>());   // what an earlier block left unclaimed
    }
}
