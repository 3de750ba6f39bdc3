using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// Llama, Mistral and Qwen2 causal LMs (HF `modeling_llama` semantics, docs/models.md), streamed like
/// OPT: the embedding, final norm and head stay loaded, each decoder layer is read when it is needed.
/// </summary>
public sealed class LlamaModel : StreamedModel, ILanguageModel
{
    public const string Prefix = "model.";
    public string Family => "llama";
    public LlamaConfig Config { get; }
    public int BlockCount => Config.Layers;
    public int MaxPositions => Config.MaxPositions;
    public int VocabSize => Config.VocabSize;

    readonly Tensor _embedTokens, _norm;
    readonly Tensor? _lmHead;
    readonly Rope _rope;

    public LlamaModel(string modelDir, Device? device = null, ScalarType computeDType = ScalarType.Float32)
        : this(modelDir, LlamaConfig.From(ConfigFile.Load(modelDir)), device, computeDType) { }

    /// <summary>The config is read first: its errors come before the weights are opened.</summary>
    LlamaModel(string modelDir, LlamaConfig config, Device? device, ScalarType computeDType)
        : base(modelDir, device, computeDType, "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
    {
        Config = config;
        try
        {
            var c = Config;
            // A tied head may be stored under either name (or both, then untied if they differ).
            if (!Checkpoint.TieHead(Prefix + "embed_tokens.weight", "lm_head.weight", c.TieWordEmbeddings) && c.TieWordEmbeddings) c.Untie();
            StoredDType = SafeDTypes.ToTorch(Checkpoint.Entry(Prefix + "embed_tokens.weight").DType);
            UnusedTensors = CheckpointLayout.Check(Checkpoint, modelDir, c.Layers, ExpectedTensors(), new[] { "lm_head.weight" });
            // The vocabulary stays in its stored dtype (rows are converted as they are looked up).
            _embedTokens = Resident(ReadAs(Prefix + "embed_tokens.weight", StoredDType, c.VocabSize, c.Hidden));
            _norm = Resident(ReadAs(Prefix + "norm.weight", ComputeDType, c.Hidden));
            if (!c.TieWordEmbeddings) _lmHead = Resident(ReadAs("lm_head.weight", StoredDType, c.VocabSize, c.Hidden));
            _rope = new Rope(c.Rope.InverseFrequencies(c.HeadDim, c.RopeTheta), c.MaxPositions, ComputeDType, Device);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    Tensor? _headCompute;
    Tensor HeadWeight => _headCompute ??= Resident((_lmHead ?? _embedTokens).to(ComputeDType).DetachFromDisposeScope());

    public Tensor Embed(Tensor ids) => EmbedAt(ids, 0);

    /// <summary>Token embeddings carry no position (RoPE rotates inside attention): the start only bounds the sequence.</summary>
    public Tensor EmbedAt(Tensor ids, int startPosition)
    {
        CheckTokens(ids, startPosition, Config.MaxPositions, Config.VocabSize);
        return Lookup(ids);
    }

    /// <summary>Packed rows: the positions only bound each sequence (RoPE reads them in the blocks); a row may hold several.</summary>
    public Tensor EmbedAt(Tensor ids, Tensor positions)
    {
        CheckPackedTokens(ids, positions, Config.MaxPositions, Config.VocabSize);
        return Lookup(ids);
    }

    /// <summary>Embedding rows of ids [batch, t] in the compute dtype.</summary>
    Tensor Lookup(Tensor ids)
    {
        using var scope = NewDisposeScope();
        long b = ids.shape[0], t = ids.shape[1];
        return _embedTokens.index_select(0, ids.reshape(-1).to(Device)).to(ComputeDType).view(b, t, -1).MoveToOuterDisposeScope();
    }

    public Tensor Head(Tensor h)
    {
        using var scope = NewDisposeScope();
        return F.linear(Norms.Rms(h, _norm, Config.RmsNormEps), HeadWeight).MoveToOuterDisposeScope();
    }

    /// <summary>The layer's tensors (local names) and shapes for its widths, in HF module order.</summary>
    public IEnumerable<(string Name, long[] Shape)> BlockTensors(int i)
    {
        var c = Config;
        long h = c.Hidden, q = (long)c.HeadsPerLayer[i] * c.HeadDim, kv = (long)c.KvHeadsPerLayer[i] * c.HeadDim, f = c.IntermediateSizes[i];
        foreach (var (name, rows, cols, bias) in new[]
        {
            ("self_attn.q_proj", q, h, c.QkvBias), ("self_attn.k_proj", kv, h, c.QkvBias), ("self_attn.v_proj", kv, h, c.QkvBias), ("self_attn.o_proj", h, q, c.OBias),
            ("mlp.gate_proj", f, h, c.MlpBias), ("mlp.up_proj", f, h, c.MlpBias), ("mlp.down_proj", h, f, c.MlpBias),
        })
        {
            yield return (name + ".weight", new[] { rows, cols });
            if (bias) yield return (name + ".bias", new[] { rows });
        }
        yield return ("input_layernorm.weight", new[] { h });
        yield return ("post_attention_layernorm.weight", new[] { h });
    }

    public LlamaBlock LoadBlock(int i)
    {
        var c = Config;
        string prefix = $"{Prefix}layers.{i}.";
        var w = PrunableBlock.ReadAll(w => { foreach (var (name, shape) in BlockTensors(i)) w[prefix + name] = ReadAs(prefix + name, ComputeDType, shape); });
        return new LlamaBlock(prefix, i, c.HeadDim, c.QueriesPerKv, c.RmsNormEps, _rope, c.SlidingWindow, w, c.NoConsumerBias) { Recycler = Checkpoint.Recycle };
    }

    IPrunableBlock IPrunableModel.LoadBlock(int index) => LoadBlock(index);

    ICachedBlock ILanguageModel.LoadCachedBlock(int index) => LoadBlock(index);

    public IEnumerable<(string Name, Tensor Tensor)> OuterTensors(ScalarType dtype)
    {
        yield return (Prefix + "embed_tokens.weight", _embedTokens.to(dtype));
        yield return (Prefix + "norm.weight", _norm.to(dtype));
        if (_lmHead is not null) yield return ("lm_head.weight", _lmHead.to(dtype));
    }

    public long BlockParameters(int i) => BlockTensors(i).Sum(t => t.Shape.Aggregate(1L, (x, y) => x * y));

    public long ParameterCount()
    {
        var c = Config;
        long n = (long)c.VocabSize * c.Hidden * (c.TieWordEmbeddings ? 1 : 2) + c.Hidden;
        for (int i = 0; i < c.Layers; i++) n += BlockParameters(i);
        return n;
    }

    public JsonObject PrunedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var c = Config;
        var cfg = (JsonObject)c.File.Json.DeepClone();
        var kv = kept.Select(k => k.Groups[0].Length).ToArray();
        var heads = kv.Select(g => g * c.QueriesPerKv).ToArray();
        var mlp = kept.Select(k => k.Groups[1].Length).ToArray();
        cfg["pruned"] = true;
        cfg["head_dim"] = c.HeadDim;   // explicit: hidden / heads no longer gives it
        cfg["intermediate_sizes"] = Ints(mlp);
        cfg["num_heads_per_layer"] = Ints(heads);
        cfg["num_key_value_heads_per_layer"] = Ints(kv);
        // Uniform widths go in the stock fields: a stock class then builds exactly the stored shapes.
        if (mlp.Distinct().Count() == 1) cfg["intermediate_size"] = mlp[0];
        if (kv.Distinct().Count() == 1)
        {
            cfg["num_attention_heads"] = heads[0];
            cfg["num_key_value_heads"] = kv[0];
        }
        SetBiasFlags(cfg, kept);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    public string? NotStockLoadable(IReadOnlyList<KeptBlock> kept)
    {
        var c = Config;
        if (kept.Select(k => k.Groups[1].Length).Distinct().Count() > 1) return $"MLP widths differ across layers (stock {c.ModelType} has one intermediate_size); export gguf writes them as arch deci";
        if (kept.Select(k => k.Groups[0].Length).Distinct().Count() > 1) return $"K/V groups differ across layers (stock {c.ModelType} has one num_key_value_heads); export gguf writes them as arch deci";
        // Biases a source already carried where the stock class has none (only a checkpoint LlmSnp wrote before stock rules existed).
        for (int j = 0; j < 2; j++)
            if (c.NoConsumerBias(j) is string why && kept.Any(k => k.ConsumerBias[j])) return why;
        if (c.ModelType == "mistral" && (c.QkvBias || c.MlpBias)) return "stock mistral has no q/k/v or MLP biases";
        if (c.ModelType == "qwen2" && c.MlpBias) return "stock qwen2 has no MLP biases";
        return null;
    }

    public JsonObject PaddedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        foreach (var k in new[] { "pruned", "intermediate_sizes", "num_heads_per_layer", "num_key_value_heads_per_layer" }) cfg.Remove(k);
        SetBiasFlags(cfg, kept);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    /// <summary>A reconstruction that added consumer biases turns on the flag that makes the stock class hold them.</summary>
    static void SetBiasFlags(JsonObject cfg, IReadOnlyList<KeptBlock> kept)
    {
        foreach (var (layer, flag) in new[] { (0, "attention_bias"), (1, "mlp_bias") })
        {
            var has = kept.Select(k => k.ConsumerBias[layer]).Distinct().ToArray();
            if (has.Length != 1) throw new InvalidOperationException($"{flag}: some layers have a consumer bias and others not");
            if (has[0]) cfg[flag] = true;
        }
    }

    static JsonArray Ints(IEnumerable<int> xs) => new(xs.Select(x => (JsonNode)x).ToArray());

    public ITextTokenizer Tokenizer() => TextTokenizers.ForModel(ModelDir);

    IEnumerable<(string Name, long[] Shape)> ExpectedTensors()
    {
        var c = Config;
        yield return (Prefix + "embed_tokens.weight", new long[] { c.VocabSize, c.Hidden });
        yield return (Prefix + "norm.weight", new long[] { c.Hidden });
        if (!c.TieWordEmbeddings) yield return ("lm_head.weight", new long[] { c.VocabSize, c.Hidden });
        for (int i = 0; i < c.Layers; i++)
            foreach (var (name, shape) in BlockTensors(i)) yield return ($"{Prefix}layers.{i}.{name}", shape);
    }

    public JsonObject Describe()
    {
        var c = Config;
        return new JsonObject
        {
            ["family"] = Family,
            ["model_type"] = c.ModelType,
            ["dtype"] = SafeDTypes.ConfigName(StoredDType),
            ["parameters"] = ParameterCount(),
            ["pruned"] = c.Pruned,
            ["layers"] = c.Layers, ["hidden_size"] = c.Hidden, ["head_dim"] = c.HeadDim,
            ["queries_per_kv_head"] = c.QueriesPerKv,
            ["vocab_size"] = c.VocabSize, ["max_position_embeddings"] = c.MaxPositions,
            ["rope_theta"] = c.RopeTheta, ["rope_scaling"] = c.Rope.Type, ["rms_norm_eps"] = c.RmsNormEps,
            ["sliding_window"] = c.SlidingWindow,
            ["tie_word_embeddings"] = c.TieWordEmbeddings,
            ["per_layer"] = new JsonArray(Enumerable.Range(0, c.Layers).Select(i => (JsonNode)new JsonObject
            {
                ["heads"] = c.HeadsPerLayer[i], ["kv_heads"] = c.KvHeadsPerLayer[i], ["intermediate_size"] = c.IntermediateSizes[i],
                ["parameters"] = BlockParameters(i),
            }).ToArray()),
        };
    }

    public override void Dispose()
    {
        _rope?.Dispose();
        base.Dispose();
    }
}
