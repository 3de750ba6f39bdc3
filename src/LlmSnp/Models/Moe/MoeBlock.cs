using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// One sparse-MoE decoder layer (HF `MixtralDecoderLayer`, `Qwen3MoeDecoderLayer`): RMSNorm, grouped-query rotary
/// attention (Qwen3-MoE: with per-head q/k norms), RMSNorm, then either the mixture — router logits h·gateᵀ, softmax
/// over all experts, top-k in descending order, divided by their sum where the config says, out = Σ_j w_j ·
/// down_j(silu(gate_j h) ⊙ up_j h) — or, at a dense layer, one SwiGLU MLP.
/// Node layers: the K/V groups (input of o_proj); then each expert's neurons (row j of its gate and up, column j of
/// its down), all reading the same input in parallel (one sub-block); or the dense MLP's neurons.
/// Inference groups the tokens by expert: one gather, three GEMMs and one scatter-add per expert, never a loop over tokens.
/// </summary>
public sealed class MoeBlock : PrunableBlock, ICachedBlock, IMixtureBlock
{
    readonly string _p;
    readonly int _index;
    readonly MoeConfig _c;
    readonly Rope _rope;
    readonly bool _sparse;
    readonly Func<int, string?> _noConsumerBias;
    long[] _experts;   // original indices of the experts held, in order

    /// <param name="noConsumerBias">Per node layer: why a consumer bias cannot be added (null: it can).</param>
    public MoeBlock(string prefix, int index, MoeConfig config, Rope rope, Dictionary<string, Tensor> tensors, Func<int, string?> noConsumerBias)
        : base(tensors, Maps(prefix, index, config))
    {
        _p = prefix; _index = index; _c = config; _rope = rope; _sparse = config.Sparse[index]; _noConsumerBias = noConsumerBias;
        _experts = _sparse ? Enumerable.Range(0, config.Experts).Select(e => (long)e).ToArray() : Array.Empty<long>();
    }

    static Producer P(string prefix, string linear) => new(prefix + linear + ".weight", prefix + linear + ".bias");

    /// <summary>The checkpoint name prefix of expert <paramref name="e"/> (original index) of a layer.</summary>
    public static string ExpertPrefix(string layerPrefix, MoeNames n, long e) => $"{layerPrefix}{n.Experts}.{e}.";

    static IReadOnlyList<UnitMap> Maps(string p, int i, MoeConfig c)
    {
        var maps = new List<UnitMap>
        {
            new($"layers.{i}.self_attn", NodeKind.Heads, c.QueriesPerKv * c.HeadDim,
                new[] { P(p, "self_attn.q_proj"), P(p, "self_attn.k_proj"), P(p, "self_attn.v_proj") },
                p + "self_attn.o_proj.weight", p + "self_attn.o_proj.bias"),
        };
        var n = c.Names;
        if (c.Sparse[i])
            for (int e = 0; e < c.Experts; e++)
            {
                string x = ExpertPrefix(p, n, e);
                maps.Add(new UnitMap($"layers.{i}.{n.Experts}.{e}", NodeKind.Expert, 1, new[] { P(x, n.Gate), P(x, n.Up) }, x + n.Down + ".weight", x + n.Down + ".bias"));
            }
        else
        {
            string m = p + n.DenseMlp + ".";
            maps.Add(new UnitMap($"layers.{i}.{n.DenseMlp}", NodeKind.Mlp, 1, new[] { P(m, "gate_proj"), P(m, "up_proj") }, m + "down_proj.weight", m + "down_proj.bias"));
        }
        return maps;
    }

    Tensor T(string name) => W[_p + name];

    Tensor Linear(Tensor x, string weightName) => F.linear(x, W[weightName + ".weight"], Optional(weightName + ".bias"));

    RotaryAttentionWeights AttentionWeights() => new(
        T("self_attn.q_proj.weight"), Optional(_p + "self_attn.q_proj.bias"), T("self_attn.k_proj.weight"), Optional(_p + "self_attn.k_proj.bias"),
        T("self_attn.v_proj.weight"), Optional(_p + "self_attn.v_proj.bias"),
        _c.QkNorm ? T("self_attn.q_norm.weight") : null, _c.QkNorm ? T("self_attn.k_norm.weight") : null);

    Tensor SelfAttention(Tensor x, KvCache? cache = null, int position = 0, Tensor? positions = null, Tensor? attend = null) =>
        RotaryAttention.Forward(x, AttentionWeights(), _c.HeadDim, _rope, _c.SlidingWindow, _c.RmsNormEps, cache, position, positions, attend);

    Tensor MlpInput(Tensor input) => Norms.Rms(input, T("post_attention_layernorm.weight"), _c.RmsNormEps);

    /// <summary>silu(gate x) ⊙ up x of a SwiGLU whose projections are <c>{prefix}{gate|up}.weight</c>.</summary>
    Tensor SwiGlu(Tensor x, string gate, string up) => F.silu(Linear(x, gate), inplace: true).mul_(Linear(x, up));

    string ExpertName(int position, string linear) => ExpertPrefix(_p, _c.Names, _experts[position]) + linear;

    public int? ExpertSubBlock => _sparse ? 1 : null;

    public int TopK => _c.TopK;

    public long[] KeptExperts => _experts.ToArray();

    public int ExpertLayer(int expert) => 1 + expert;

    public override IReadOnlyList<int[]> SubBlocks => _sparse
        ? new[] { new[] { 0 }, Enumerable.Range(1, _experts.Length).ToArray() }
        : base.SubBlocks;

    public override Tensor Activations(int layer, Tensor input)
    {
        using var scope = NewDisposeScope();
        if (layer == 0) return SelfAttention(Norms.Rms(input, T("input_layernorm.weight"), _c.RmsNormEps)).MoveToOuterDisposeScope();
        var x = MlpInput(input);
        // An expert's activations on every token (what it would compute if the router chose it everywhere); the
        // engine's statistics come from Route instead, on the tokens routed to it.
        var a = _sparse ? SwiGlu(x, ExpertName(layer - 1, _c.Names.Gate), ExpertName(layer - 1, _c.Names.Up))
            : SwiGlu(x, _p + _c.Names.DenseMlp + ".gate_proj", _p + _c.Names.DenseMlp + ".up_proj");
        return a.MoveToOuterDisposeScope();
    }

    public override Tensor Residual(int layer, Tensor input, Tensor activations)
    {
        if (layer > 0 && _sparse) throw new InvalidOperationException("experts advance together (Advance of the expert sub-block)");
        using var scope = NewDisposeScope();
        var (w, bias) = Consumer(layer);
        return (input + F.linear(activations, w, bias)).MoveToOuterDisposeScope();
    }

    public override void Collect(int subBlock, Tensor input, Action<int, Tensor, Tensor?> collect)
    {
        if (subBlock == ExpertSubBlock) Route(input, r => collect(r.Layer, r.Activations, r.Weights));
        else base.Collect(subBlock, input, collect);
    }

    public override Tensor Advance(int subBlock, Tensor input)
    {
        if (subBlock != ExpertSubBlock) return base.Advance(subBlock, input);
        using var scope = NewDisposeScope();
        return (input + Mixture(MlpInput(input), null, outputs: true)!).MoveToOuterDisposeScope();
    }

    public void Route(Tensor input, Action<RoutedBatch> each)
    {
        if (!_sparse) throw new InvalidOperationException($"layer {_index} has no experts");
        using var scope = NewDisposeScope();
        Mixture(MlpInput(input), each, outputs: false);
    }

    /// <summary>
    /// The router's choice for tokens x [N, hidden]: per token the top-k experts (descending probability) and the
    /// weights their outputs carry ([N, k] each). The softmax runs in float32 at least (HF: dtype=torch.float).
    /// </summary>
    (Tensor Weights, Tensor Experts) Choose(Tensor x)
    {
        var logits = F.linear(x, T(_c.Names.Router + ".weight"));
        var p = F.softmax(logits.to(x.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32), -1);
        var (w, sel) = p.topk(_c.TopK, -1, largest: true, sorted: true);
        if (_c.NormTopK) w = w / w.sum(-1, keepdim: true);
        return (w.to(x.dtype), sel);
    }

    /// <summary>
    /// The mixture on normed hidden states x [b, t, hidden]: tokens grouped by expert (one stable sort of the chosen
    /// experts), each expert run once on its tokens; <paramref name="each"/> sees every expert's batch; with
    /// <paramref name="outputs"/> the weighted outputs are summed per token ([b, t, hidden]), else null.
    /// </summary>
    Tensor? Mixture(Tensor x, Action<RoutedBatch>? each, bool outputs)
    {
        long h = x.shape[^1];
        var flat = x.reshape(-1, h);
        long n = flat.shape[0];
        int k = _c.TopK;
        var (w, sel) = Choose(flat);
        var flatSel = sel.reshape(-1);
        var (_, order) = flatSel.sort(stable: true);
        var counts = torch.bincount(flatSel, minlength: _experts.Length).cpu().data<long>().ToArray();
        var tokenOfSlot = torch.arange(n, device: x.device).repeat_interleave(k);
        var flatW = w.reshape(-1);
        var output = outputs ? torch.zeros_like(flat) : null;
        long offset = 0;
        for (int e = 0; e < _experts.Length; e++)
        {
            long count = counts[e];
            if (count == 0) continue;
            using var expertScope = NewDisposeScope();
            var slots = order.narrow(0, offset, count);
            offset += count;
            var tokens = tokenOfSlot.index_select(0, slots);
            var a = SwiGlu(flat.index_select(0, tokens), ExpertName(e, _c.Names.Gate), ExpertName(e, _c.Names.Up));
            var weights = flatW.index_select(0, slots);
            each?.Invoke(new RoutedBatch(ExpertLayer(e), e, slots, weights, a));
            if (output is not null)
            {
                var (down, bias) = Consumer(ExpertLayer(e));
                output.index_add_(0, tokens, F.linear(a, down, bias).mul_(weights.unsqueeze(1)), 1);
            }
        }
        return output?.view(x.shape);
    }

    public Tensor Step(Tensor hidden, KvCache cache, int position)
    {
        using var scope = NewDisposeScope();
        var a = SelfAttention(Norms.Rms(hidden, T("input_layernorm.weight"), _c.RmsNormEps), cache, position);
        var h = Residual(0, hidden, a);
        return (_sparse ? Advance(1, h) : Residual(1, h, Activations(1, h))).MoveToOuterDisposeScope();
    }

    /// <summary>The block on packed rows (routing is per token, so packing changes nothing there).</summary>
    public Tensor ForwardMasked(Tensor hidden, Tensor positions, Tensor attend)
    {
        using var scope = NewDisposeScope();
        var a = SelfAttention(Norms.Rms(hidden, T("input_layernorm.weight"), _c.RmsNormEps), positions: positions, attend: attend);
        var h = Residual(0, hidden, a);
        return (_sparse ? Advance(1, h) : Residual(1, h, Activations(1, h))).MoveToOuterDisposeScope();
    }

    public void KeepExperts(long[] keep)
    {
        if (!_sparse) throw new InvalidOperationException($"layer {_index} has no experts");
        if (keep.Length == 0 || keep.Any(e => e < 0 || e >= _experts.Length) || keep.Distinct().Count() != keep.Length || !keep.SequenceEqual(keep.Order()))
            throw new ArgumentException($"experts to keep must be distinct ascending positions below {_experts.Length}");
        string router = _p + _c.Names.Router + ".weight";
        using (var idx = torch.tensor(keep, device: W[router].device))
        {
            var old = W[router];
            W[router] = old.index_select(0, idx).DetachFromDisposeScope();
            old.Dispose();
        }
        var removed = Enumerable.Range(0, _experts.Length).Where(e => !keep.Contains(e)).ToArray();
        var n = _c.Names;
        var tensors = removed.SelectMany(e => new[] { n.Gate, n.Up, n.Down }.SelectMany(l => new[] { ExpertName(e, l) + ".weight", ExpertName(e, l) + ".bias" })).ToArray();
        RemoveNodeLayers(removed.Select(ExpertLayer).ToArray(), tensors);
        _experts = keep.Select(e => _experts[e]).ToArray();
    }

    public long[] ExpertParameters()
    {
        var layers = NodeLayers;
        return Enumerable.Range(0, _experts.Length).Select(e => layers[ExpertLayer(e)].Groups * layers[ExpertLayer(e)].ParamsPerGroup).ToArray();
    }

    public override bool CanAddConsumerBias(int layer, out string reason)
    {
        var why = _noConsumerBias(layer);
        reason = why ?? "";
        return why is null;
    }

    /// <summary>Experts are written under their position among the kept ones (the stock class numbers them 0 .. experts−1).</summary>
    protected override IEnumerable<(string Name, Tensor Tensor)> ToCheckpoint(IReadOnlyDictionary<string, Tensor> tensors)
    {
        if (!_sparse) return base.ToCheckpoint(tensors);
        var renamed = _experts.Select((orig, pos) => (From: ExpertPrefix(_p, _c.Names, orig), To: ExpertPrefix(_p, _c.Names, pos))).ToArray();
        return tensors.Select(kv =>
        {
            foreach (var (from, to) in renamed)
                if (kv.Key.StartsWith(from, StringComparison.Ordinal)) return (to + kv.Key[from.Length..], kv.Value);
            return (kv.Key, kv.Value);
        });
    }
}
