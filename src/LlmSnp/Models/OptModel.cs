using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Pruning;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// OPT (HF `modeling_opt` semantics, models.md §2), streamed: the embeddings and head stay loaded,
/// each decoder block is read from the checkpoint when it is needed and released after.
/// </summary>
public sealed class OptModel : IPrunableModel
{
    public const double LayerNormEps = 1e-5;
    public string Family => "opt";
    public OptConfig Config { get; }
    public CheckpointReader Checkpoint { get; }
    public string ModelDir { get; }
    public Device Device { get; }
    public ScalarType ComputeDType { get; }
    public ScalarType StoredDType { get; }
    public int BlockCount => Config.Layers;
    /// <summary>"model.decoder." or "decoder." — both exist in the wild.</summary>
    public string Prefix { get; }

    readonly Tensor _embedTokens, _embedPositions;
    readonly Tensor? _projectIn, _projectOut, _finalLnW, _finalLnB, _lmHead;
    readonly bool _lmHeadStored;

    public OptModel(string modelDir, Device? device = null, ScalarType computeDType = ScalarType.Float32)
    {
        ModelDir = modelDir;
        Config = OptConfig.From(ConfigFile.Load(modelDir));
        Device = device ?? CPU;
        ComputeDType = computeDType;
        Checkpoint = new CheckpointReader(modelDir);
        try
        {
            Prefix = Checkpoint.Has("model.decoder.embed_tokens.weight") ? "model.decoder."
                : Checkpoint.Has("decoder.embed_tokens.weight") ? "decoder."
                : throw new LlmSnpException($"{modelDir}: no OPT embedding tensor (model.decoder.embed_tokens.weight or decoder.embed_tokens.weight)");
            StoredDType = SafeDTypes.ToTorch(Checkpoint.Entry(Prefix + "embed_tokens.weight").DType);
            var c = Config;
            _embedTokens = Load("embed_tokens.weight", c.VocabSize, c.WordEmbedProjDim);
            _embedPositions = Load("embed_positions.weight", c.MaxPositions + 2, c.Hidden);
            if (c.WordEmbedProjDim != c.Hidden)
            {
                _projectIn = Load("project_in.weight", c.Hidden, c.WordEmbedProjDim);
                _projectOut = Load("project_out.weight", c.WordEmbedProjDim, c.Hidden);
            }
            if (c.PreLayerNorm)
            {
                _finalLnW = Load("final_layer_norm.weight", c.Hidden);
                _finalLnB = Load("final_layer_norm.bias", c.Hidden);
            }
            _lmHeadStored = Checkpoint.Has("lm_head.weight");
            if (!c.TieWordEmbeddings)
            {
                if (!_lmHeadStored) throw new LlmSnpException($"{modelDir}: tie_word_embeddings is false but lm_head.weight is missing");
                _lmHead = Read("lm_head.weight", c.VocabSize, c.WordEmbedProjDim);
            }
        }
        catch
        {
            Checkpoint.Dispose();
            throw;
        }
    }

    Tensor Load(string name, params long[] shape) => Read(Prefix + name, shape);

    internal Tensor Read(string fullName, params long[] shape)
    {
        var e = Checkpoint.Entry(fullName);
        if (!e.Shape.SequenceEqual(shape))
            throw new LlmSnpException($"{ModelDir}: tensor '{fullName}' has shape [{string.Join(", ", e.Shape)}], config says [{string.Join(", ", shape)}]");
        return Checkpoint.Read(fullName, ComputeDType, Device);
    }

    /// <summary>Token ids [batch, tokens] → hidden states [batch, tokens, hidden], positions from 0.</summary>
    public Tensor Embed(Tensor ids)
    {
        using var scope = NewDisposeScope();
        long b = ids.shape[0], t = ids.shape[1];
        if (t > Config.MaxPositions) throw new LlmSnpException($"sequence of {t} tokens exceeds max_position_embeddings {Config.MaxPositions}");
        var h = _embedTokens.index_select(0, ids.reshape(-1).to(Device)).view(b, t, -1);
        if (_projectIn is not null) h = F.linear(h, _projectIn);
        h = h + _embedPositions.narrow(0, 2, t).unsqueeze(0);   // learned positions with offset 2
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>Hidden states after the last block → logits [batch, tokens, vocab].</summary>
    public Tensor Head(Tensor h)
    {
        using var scope = NewDisposeScope();
        if (_finalLnW is not null) h = F.layer_norm(h, new long[] { Config.Hidden }, _finalLnW, _finalLnB, LayerNormEps);
        if (_projectOut is not null) h = F.linear(h, _projectOut);
        var logits = F.linear(h, _lmHead ?? _embedTokens);
        return logits.MoveToOuterDisposeScope();
    }

    public OptBlock LoadBlock(int i) => new(this, i);
    IPrunableBlock IPrunableModel.LoadBlock(int index) => LoadBlock(index);

    /// <summary>Full forward with every block loaded at once (reference path for tests).</summary>
    public Tensor ForwardAllInMemory(Tensor ids)
    {
        var blocks = Enumerable.Range(0, BlockCount).Select(LoadBlock).ToList();
        try
        {
            using var scope = NewDisposeScope();
            var h = Embed(ids);
            foreach (var b in blocks) h = b.Forward(h)!;
            return Head(h).MoveToOuterDisposeScope();
        }
        finally { blocks.ForEach(b => b.Dispose()); }
    }

    public IEnumerable<(string Name, Tensor Tensor)> OuterTensors(ScalarType dtype)
    {
        yield return (Prefix + "embed_tokens.weight", _embedTokens.to(dtype));
        yield return (Prefix + "embed_positions.weight", _embedPositions.to(dtype));
        if (_projectIn is not null) yield return (Prefix + "project_in.weight", _projectIn.to(dtype));
        if (_projectOut is not null) yield return (Prefix + "project_out.weight", _projectOut.to(dtype));
        if (_finalLnW is not null)
        {
            yield return (Prefix + "final_layer_norm.weight", _finalLnW.to(dtype));
            yield return (Prefix + "final_layer_norm.bias", _finalLnB!.to(dtype));
        }
        if (_lmHead is not null) yield return ("lm_head.weight", _lmHead.to(dtype));
    }

    public JsonObject PrunedConfig(IReadOnlyList<int[]> unitsKept, IReadOnlyList<long[]> headsKeptIndices, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        cfg["pruned"] = true;
        cfg["ffn_dims"] = new JsonArray(unitsKept.Select(u => (JsonNode)u[1]).ToArray());
        cfg["num_heads_per_layer"] = new JsonArray(unitsKept.Select(u => (JsonNode)(u[0] / Config.HeadDim)).ToArray());
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    /// <summary>config.json of the zero-padded export: the original shapes, loadable by stock tools.</summary>
    public JsonObject PaddedConfig(ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        foreach (var k in new[] { "pruned", "ffn_dims", "num_heads_per_layer" }) cfg.Remove(k);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    public IEnumerable<string> CompanionFiles() =>
        new[] { "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "generation_config.json" }
            .Select(f => Path.Combine(ModelDir, f)).Where(File.Exists);

    /// <summary>Parameter count of the model as configured (per-layer widths honoured).</summary>
    public long ParameterCount()
    {
        var c = Config;
        long n = (long)c.VocabSize * c.WordEmbedProjDim + (long)(c.MaxPositions + 2) * c.Hidden;
        if (c.WordEmbedProjDim != c.Hidden) n += 2L * c.Hidden * c.WordEmbedProjDim;
        if (c.PreLayerNorm) n += 2L * c.Hidden;
        if (!c.TieWordEmbeddings) n += (long)c.VocabSize * c.WordEmbedProjDim;
        for (int i = 0; i < c.Layers; i++) n += BlockParameters(c.HeadsPerLayer[i], c.FfnDims[i]);
        return n;
    }

    public long BlockParameters(int heads, int ffn)
    {
        long h = Config.Hidden, a = (long)heads * Config.HeadDim;
        return 3 * (a * h + a) + (h * a + h) + 4 * h + (ffn * h + ffn) + (h * ffn + h);
    }

    public void Dispose()
    {
        foreach (var t in new[] { _embedTokens, _embedPositions, _projectIn, _projectOut, _finalLnW, _finalLnB, _lmHead }) t?.Dispose();
        Checkpoint.Dispose();
    }
}

/// <summary>One OPT decoder layer, resident on the device.</summary>
public sealed class OptBlock : IPrunableBlock
{
    readonly OptModel _m;
    readonly int _index;
    readonly Dictionary<string, Tensor> _w = new(StringComparer.Ordinal);
    readonly int _origHeads, _origFfn;
    long[] _keptHeadUnits, _keptNeurons;   // original indices, for the padded export

    static readonly string[] Names =
    {
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "final_layer_norm.weight", "final_layer_norm.bias",
    };

    internal OptBlock(OptModel m, int index)
    {
        _m = m; _index = index;
        var c = m.Config;
        int a = c.HeadsPerLayer[index] * c.HeadDim, f = c.FfnDims[index], h = c.Hidden;
        // A pruned checkpoint records original widths only through the padded export; in-place it keeps its own.
        _origHeads = c.HeadsPerLayer[index];
        _origFfn = f;
        _keptHeadUnits = Enumerable.Range(0, a).Select(x => (long)x).ToArray();
        _keptNeurons = Enumerable.Range(0, f).Select(x => (long)x).ToArray();
        var shapes = new Dictionary<string, long[]>
        {
            ["self_attn.q_proj.weight"] = new long[] { a, h }, ["self_attn.q_proj.bias"] = new long[] { a },
            ["self_attn.k_proj.weight"] = new long[] { a, h }, ["self_attn.k_proj.bias"] = new long[] { a },
            ["self_attn.v_proj.weight"] = new long[] { a, h }, ["self_attn.v_proj.bias"] = new long[] { a },
            ["self_attn.out_proj.weight"] = new long[] { h, a }, ["self_attn.out_proj.bias"] = new long[] { h },
            ["self_attn_layer_norm.weight"] = new long[] { h }, ["self_attn_layer_norm.bias"] = new long[] { h },
            ["fc1.weight"] = new long[] { f, h }, ["fc1.bias"] = new long[] { f },
            ["fc2.weight"] = new long[] { h, f }, ["fc2.bias"] = new long[] { h },
            ["final_layer_norm.weight"] = new long[] { h }, ["final_layer_norm.bias"] = new long[] { h },
        };
        try
        {
            foreach (var n in Names) _w[n] = m.Read(FullName(n), shapes[n]);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    string FullName(string n) => $"{_m.Prefix}layers.{_index}.{n}";
    int HeadDim => _m.Config.HeadDim;
    int Hidden => _m.Config.Hidden;

    public IReadOnlyList<NodeLayerInfo> NodeLayers => new[]
    {
        new NodeLayerInfo($"layers.{_index}.self_attn", NodeKind.Heads, (int)_w["self_attn.q_proj.bias"].shape[0], HeadDim, 4L * HeadDim * Hidden + 3L * HeadDim),
        new NodeLayerInfo($"layers.{_index}.fc1", NodeKind.Mlp, (int)_w["fc1.bias"].shape[0], 1, 2L * Hidden + 1),
    };

    Tensor LayerNorm(Tensor x, string name) =>
        F.layer_norm(x, new long[] { Hidden }, _w[name + ".weight"], _w[name + ".bias"], OptModel.LayerNormEps);

    /// <summary>Per-head outputs softmax(QKᵀ/√d)V concatenated: the input of out_proj.</summary>
    Tensor HeadOutputs(Tensor x)
    {
        long b = x.shape[0], t = x.shape[1];
        int d = HeadDim;
        Tensor Split(Tensor y) => y.view(b, t, -1, d).transpose(1, 2);
        var q = Split(F.linear(x, _w["self_attn.q_proj.weight"], _w["self_attn.q_proj.bias"]));
        var k = Split(F.linear(x, _w["self_attn.k_proj.weight"], _w["self_attn.k_proj.bias"]));
        var v = Split(F.linear(x, _w["self_attn.v_proj.weight"], _w["self_attn.v_proj.bias"]));
        // SDPA's default scale 1/√d on the scores equals HF's scaling of q after its bias.
        var o = F.scaled_dot_product_attention(q, k, v, null, 0.0, true);
        return o.transpose(1, 2).reshape(b, t, -1);
    }

    public Tensor? Forward(Tensor hidden, int captureLayer = -1, Action<Tensor>? capture = null)
    {
        using var scope = NewDisposeScope();
        bool pre = _m.Config.PreLayerNorm;
        var x = pre ? LayerNorm(hidden, "self_attn_layer_norm") : hidden;
        var heads = HeadOutputs(x);
        if (captureLayer == 0) { capture!(heads.reshape(-1, heads.shape[2])); return null; }
        var h = hidden + F.linear(heads, _w["self_attn.out_proj.weight"], _w["self_attn.out_proj.bias"]);
        if (!pre) h = LayerNorm(h, "self_attn_layer_norm");
        x = pre ? LayerNorm(h, "final_layer_norm") : h;
        var act = F.relu(F.linear(x, _w["fc1.weight"], _w["fc1.bias"]));
        if (captureLayer == 1) { capture!(act.reshape(-1, act.shape[2])); return null; }
        h = h + F.linear(act, _w["fc2.weight"], _w["fc2.bias"]);
        if (!pre) h = LayerNorm(h, "final_layer_norm");
        return h.MoveToOuterDisposeScope();
    }

    public (Tensor Weight, Tensor Bias) Consumer(int layer) => layer == 0
        ? (_w["self_attn.out_proj.weight"], _w["self_attn.out_proj.bias"])
        : (_w["fc2.weight"], _w["fc2.bias"]);

    public Tensor ProducerSquaredNorms(int layer)
    {
        using var scope = NewDisposeScope();
        Tensor RowSq(string p) => _w[p + ".weight"].square().sum(1) + _w[p + ".bias"].square();
        var r = layer == 0
            ? RowSq("self_attn.q_proj") + RowSq("self_attn.k_proj") + RowSq("self_attn.v_proj")
            : RowSq("fc1");
        return r.MoveToOuterDisposeScope();
    }

    public void Prune(int layer, long[] keptUnits, Tensor consumerWeight, Tensor consumerBias)
    {
        using var idx = torch.tensor(keptUnits, device: _m.Device);
        string[] producers = layer == 0 ? new[] { "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj" } : new[] { "fc1" };
        foreach (var p in producers)
        {
            Replace(p + ".weight", _w[p + ".weight"].index_select(0, idx));
            Replace(p + ".bias", _w[p + ".bias"].index_select(0, idx));
        }
        string consumer = layer == 0 ? "self_attn.out_proj" : "fc2";
        Replace(consumer + ".weight", consumerWeight.to(_m.ComputeDType, _m.Device));
        Replace(consumer + ".bias", consumerBias.to(_m.ComputeDType, _m.Device));
        // Keep the original indices so the padded export can put the rows back in place.
        if (layer == 0) _keptHeadUnits = keptUnits.Select(u => _keptHeadUnits[u]).ToArray();
        else _keptNeurons = keptUnits.Select(u => _keptNeurons[u]).ToArray();
    }

    void Replace(string name, Tensor t)
    {
        var old = _w[name];
        _w[name] = t.contiguous().DetachFromDisposeScope();
        if (!ReferenceEquals(old, _w[name])) old.Dispose();
    }

    public IEnumerable<(string Name, Tensor Tensor)> Tensors(ScalarType dtype) =>
        Names.Select(n => (FullName(n), _w[n].to(dtype)));

    public IEnumerable<(string Name, Tensor Tensor)> PaddedTensors(ScalarType dtype)
    {
        int a = _origHeads * HeadDim;
        foreach (var n in Names)
        {
            var t = _w[n];
            (int dim, long full, long[] kept)? pad = n switch
            {
                "self_attn.q_proj.weight" or "self_attn.q_proj.bias" or "self_attn.k_proj.weight" or "self_attn.k_proj.bias"
                    or "self_attn.v_proj.weight" or "self_attn.v_proj.bias" => (0, a, _keptHeadUnits),
                "self_attn.out_proj.weight" => (1, a, _keptHeadUnits),
                "fc1.weight" or "fc1.bias" => (0, _origFfn, _keptNeurons),
                "fc2.weight" => (1, _origFfn, _keptNeurons),
                _ => null,
            };
            yield return (FullName(n), pad is { } p ? ZeroPad(t, p.dim, p.full, p.kept).to(dtype) : t.to(dtype));
        }
    }

    internal static Tensor ZeroPad(Tensor t, int dim, long full, long[] kept)
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
