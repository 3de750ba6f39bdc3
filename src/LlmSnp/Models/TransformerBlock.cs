using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>The tensors of a transformer block by role, whatever a family calls them.</summary>
public enum Role
{
    QW, QB, KW, KB, VW, VB, OW, OB,   // attention projections; O = out_proj / attention.output.dense
    Ln1W, Ln1B, Ln2W, Ln2B,           // the norm before attention (pre-LN) / after it (post-LN), and the MLP's
    Fc1W, Fc1B, Fc2W, Fc2B,
}

public enum Activation { Relu, Gelu }

/// <summary>What distinguishes one family's block from another's.</summary>
public sealed record BlockSpec(int Hidden, int HeadDim, bool PreLayerNorm, bool Causal, Activation Activation, double LayerNormEps);

/// <summary>
/// One transformer block (attention + MLP), resident on the device. OPT and ViT blocks differ
/// only in <see cref="BlockSpec"/> and tensor names, so the forward and the pruning surgery live
/// here once; the family maps roles to its checkpoint names.
/// </summary>
public sealed class TransformerBlock : IPrunableBlock
{
    readonly BlockSpec _s;
    readonly Dictionary<Role, Tensor> _w;
    readonly string _headsName, _mlpName;
    readonly Func<IReadOnlyDictionary<Role, Tensor>, IEnumerable<(string Name, Tensor Tensor)>> _toCheckpoint;
    readonly int _origHeadUnits, _origFfn;
    long[] _keptHeadUnits, _keptNeurons;   // original indices, for the padded export

    /// <summary>Shape of every role for attention width <paramref name="a"/> (heads × head_dim), MLP width <paramref name="f"/> and model width <paramref name="h"/>.</summary>
    public static Dictionary<Role, long[]> Shapes(long a, long f, long h) => new()
    {
        [Role.QW] = new[] { a, h }, [Role.QB] = new[] { a }, [Role.KW] = new[] { a, h }, [Role.KB] = new[] { a },
        [Role.VW] = new[] { a, h }, [Role.VB] = new[] { a }, [Role.OW] = new[] { h, a }, [Role.OB] = new[] { h },
        [Role.Ln1W] = new[] { h }, [Role.Ln1B] = new[] { h }, [Role.Ln2W] = new[] { h }, [Role.Ln2B] = new[] { h },
        [Role.Fc1W] = new[] { f, h }, [Role.Fc1B] = new[] { f }, [Role.Fc2W] = new[] { h, f }, [Role.Fc2B] = new[] { h },
    };

    /// <summary>Reads a block's role tensors; on failure releases whatever was already read.</summary>
    public static Dictionary<Role, Tensor> ReadRoles(Action<Dictionary<Role, Tensor>> fill)
    {
        var w = new Dictionary<Role, Tensor>();
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

    /// <summary>Parameters of a block of these widths (every role's element count).</summary>
    public static long ParameterCount(long a, long f, long h) => Shapes(a, f, h).Values.Sum(s => s.Aggregate(1L, (x, y) => x * y));

    static readonly Role[] HeadProducers = { Role.QW, Role.QB, Role.KW, Role.KB, Role.VW, Role.VB };

    /// <param name="nodeLayerNames">Names of the head and MLP node layers in reports (the checkpoint's own).</param>
    /// <param name="weights">Role → tensor (taken over: the block disposes them).</param>
    /// <param name="toCheckpoint">Role tensors → the family's checkpoint names (may fuse).</param>
    public TransformerBlock(BlockSpec spec, (string Heads, string Mlp) nodeLayerNames, Dictionary<Role, Tensor> weights,
        Func<IReadOnlyDictionary<Role, Tensor>, IEnumerable<(string Name, Tensor Tensor)>> toCheckpoint)
    {
        _s = spec; (_headsName, _mlpName) = nodeLayerNames; _w = weights; _toCheckpoint = toCheckpoint;
        _origHeadUnits = (int)weights[Role.QB].shape[0];
        _origFfn = (int)weights[Role.Fc1B].shape[0];
        _keptHeadUnits = Enumerable.Range(0, _origHeadUnits).Select(x => (long)x).ToArray();
        _keptNeurons = Enumerable.Range(0, _origFfn).Select(x => (long)x).ToArray();
    }

    public IReadOnlyList<NodeLayerInfo> NodeLayers => new[]
    {
        new NodeLayerInfo(_headsName, NodeKind.Heads, (int)_w[Role.QB].shape[0], _s.HeadDim, 4L * _s.HeadDim * _s.Hidden + 3L * _s.HeadDim),
        new NodeLayerInfo(_mlpName, NodeKind.Mlp, (int)_w[Role.Fc1B].shape[0], 1, 2L * _s.Hidden + 1),
    };

    Tensor LayerNorm(Tensor x, Role w, Role b) => F.layer_norm(x, new long[] { _s.Hidden }, _w[w], _w[b], _s.LayerNormEps);

    /// <summary>Per-head outputs softmax(QKᵀ/√d)V concatenated: the input of the output projection.</summary>
    Tensor HeadOutputs(Tensor x)
    {
        long b = x.shape[0], t = x.shape[1];
        Tensor Split(Role w, Role bias) => F.linear(x, _w[w], _w[bias]).view(b, t, -1, _s.HeadDim).transpose(1, 2);
        // SDPA's default scale 1/√d on the scores equals scaling q after its bias (HF OPT) or the scores (ViT).
        var o = F.scaled_dot_product_attention(Split(Role.QW, Role.QB), Split(Role.KW, Role.KB), Split(Role.VW, Role.VB), null, 0.0, _s.Causal);
        return o.transpose(1, 2).reshape(b, t, -1);
    }

    public Tensor Activations(int layer, Tensor input)
    {
        using var scope = NewDisposeScope();
        bool pre = _s.PreLayerNorm;
        if (layer == 0) return HeadOutputs(pre ? LayerNorm(input, Role.Ln1W, Role.Ln1B) : input).MoveToOuterDisposeScope();
        var z = F.linear(pre ? LayerNorm(input, Role.Ln2W, Role.Ln2B) : input, _w[Role.Fc1W], _w[Role.Fc1B]);
        return (_s.Activation == Activation.Relu ? F.relu(z) : F.gelu(z)).MoveToOuterDisposeScope();   // gelu: exact (erf)
    }

    public Tensor Residual(int layer, Tensor input, Tensor activations)
    {
        using var scope = NewDisposeScope();
        var (w, b) = Consumer(layer);
        var h = input + F.linear(activations, w, b);
        // Post-LN (OPT-350m): the norm follows each residual add.
        if (!_s.PreLayerNorm) h = layer == 0 ? LayerNorm(h, Role.Ln1W, Role.Ln1B) : LayerNorm(h, Role.Ln2W, Role.Ln2B);
        return h.MoveToOuterDisposeScope();
    }

    public Tensor? Forward(Tensor hidden, int captureLayer = -1, Action<Tensor>? capture = null)
    {
        using var scope = NewDisposeScope();
        var h = hidden;
        for (int j = 0; j < 2; j++)
        {
            var a = Activations(j, h);
            if (captureLayer == j) { capture!(a.reshape(-1, a.shape[2])); return null; }
            h = Residual(j, h, a);
        }
        return h.MoveToOuterDisposeScope();
    }

    public (Tensor Weight, Tensor Bias) Consumer(int layer) =>
        layer == 0 ? (_w[Role.OW], _w[Role.OB]) : (_w[Role.Fc2W], _w[Role.Fc2B]);

    public Tensor ProducerSquaredNorms(int layer)
    {
        using var scope = NewDisposeScope();
        Tensor RowSq(Role w, Role b) => _w[w].square().sum(1) + _w[b].square();
        var r = layer == 0
            ? RowSq(Role.QW, Role.QB) + RowSq(Role.KW, Role.KB) + RowSq(Role.VW, Role.VB)
            : RowSq(Role.Fc1W, Role.Fc1B);
        return r.MoveToOuterDisposeScope();
    }

    public void Prune(int layer, long[] keptUnits, Tensor consumerWeight, Tensor consumerBias)
    {
        var device = _w[Role.QW].device;
        var dtype = _w[Role.QW].dtype;
        using var idx = torch.tensor(keptUnits, device: device);
        foreach (var r in layer == 0 ? HeadProducers : new[] { Role.Fc1W, Role.Fc1B })
            Replace(r, _w[r].index_select(0, idx));
        Replace(layer == 0 ? Role.OW : Role.Fc2W, consumerWeight.to(dtype, device));
        Replace(layer == 0 ? Role.OB : Role.Fc2B, consumerBias.to(dtype, device));
        if (layer == 0) _keptHeadUnits = keptUnits.Select(u => _keptHeadUnits[u]).ToArray();
        else _keptNeurons = keptUnits.Select(u => _keptNeurons[u]).ToArray();
    }

    void Replace(Role r, Tensor t)
    {
        var old = _w[r];
        _w[r] = t.contiguous().DetachFromDisposeScope();
        if (!ReferenceEquals(old, _w[r])) old.Dispose();
    }

    /// <summary>Original indices of the heads kept so far.</summary>
    public long[] KeptHeads => _keptHeadUnits.Where(u => u % _s.HeadDim == 0).Select(u => u / _s.HeadDim).ToArray();

    public IEnumerable<(string Name, Tensor Tensor)> Tensors(ScalarType dtype) =>
        _toCheckpoint(_w.ToDictionary(kv => kv.Key, kv => kv.Value.to(dtype)));

    public IEnumerable<(string Name, Tensor Tensor)> PaddedTensors(ScalarType dtype)
    {
        var padded = new Dictionary<Role, Tensor>();
        foreach (var (r, t) in _w)
        {
            Tensor p = r switch
            {
                Role.QW or Role.QB or Role.KW or Role.KB or Role.VW or Role.VB => ZeroPad(t, 0, _origHeadUnits, _keptHeadUnits),
                Role.OW => ZeroPad(t, 1, _origHeadUnits, _keptHeadUnits),
                Role.Fc1W or Role.Fc1B => ZeroPad(t, 0, _origFfn, _keptNeurons),
                Role.Fc2W => ZeroPad(t, 1, _origFfn, _keptNeurons),
                _ => t,
            };
            padded[r] = p.to(dtype);
        }
        return _toCheckpoint(padded);
    }

    static Tensor ZeroPad(Tensor t, int dim, long full, long[] kept)
    {
        var shape = t.shape.ToArray();
        shape[dim] = full;
        var z = torch.zeros(shape, t.dtype, t.device);
        using var idx = torch.tensor(kept, device: t.device);
        return z.index_copy_(dim, idx, t);
    }

    public void Dispose()
    {
        foreach (var t in _w.Values) t.Dispose();
        _w.Clear();
    }
}
