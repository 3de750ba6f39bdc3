using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// Qwen3 causal LMs (HF `Qwen3ForCausalLM`, docs/models.md "Qwen3"), streamed block by block: the embedding, final norm
/// and head stay loaded, each decoder layer is read when it is needed.
/// </summary>
public sealed class Qwen3Model : StreamedModel, ILanguageModel
{
    public const string Prefix = "model.";
    public string Family => "qwen3";
    public Qwen3Config Config { get; }
    public int BlockCount => Config.Layers;
    public int MaxPositions => Config.MaxPositions;
    public int VocabSize => Config.VocabSize;

    readonly Tensor _embedTokens, _norm;
    readonly Tensor? _lmHead;
    readonly Rope _rope;

    public Qwen3Model(string modelDir, Device? device = null, ScalarType computeDType = ScalarType.Float32)
        : this(modelDir, Qwen3Config.From(ConfigFile.Load(modelDir)), device, computeDType) { }

    /// <summary>The config is read first: its errors come before the weights are opened.</summary>
    Qwen3Model(string modelDir, Qwen3Config config, Device? device, ScalarType computeDType)
        : base(modelDir, device, computeDType, "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
            "added_tokens.json", "generation_config.json")
    {
        Config = config;
        try
        {
            var c = Config;
            // A tied head may be stored under either name (or both, then untied if they differ).
            if (!Checkpoint.TieHead(Prefix + "embed_tokens.weight", "lm_head.weight", c.TieWordEmbeddings) && c.TieWordEmbeddings) c.Untie();
            StoredDType = SafeDTypes.ToTorch(Checkpoint.Entry(Prefix + "embed_tokens.weight").DType);
            UnusedTensors = CheckpointLayout.Check(Checkpoint, modelDir, c.Layers, ExpectedTensors(), new[] { "lm_head.weight" });
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

    public Tensor EmbedAt(Tensor ids, int startPosition)
    {
        CheckTokens(ids, startPosition, Config.MaxPositions, Config.VocabSize);
        return Lookup(ids);
    }

    /// <summary>Packed rows: the positions only bound each sequence (RoPE reads them in the blocks).</summary>
    public Tensor EmbedAt(Tensor ids, Tensor positions)
    {
        CheckPackedTokens(ids, positions, Config.MaxPositions, Config.VocabSize);
        return Lookup(ids);
    }

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

    public Qwen3Block LoadBlock(int i)
    {
        string prefix = $"{Prefix}layers.{i}.";
        var w = PrunableBlock.ReadAll(w => { foreach (var (name, shape) in Qwen3Block.Tensors(Config, i)) w[prefix + name] = ReadAs(prefix + name, ComputeDType, shape); });
        return new Qwen3Block(prefix, i, Config, _rope, w) { Recycler = Checkpoint.Recycle };
    }

    IPrunableBlock IPrunableModel.LoadBlock(int index) => LoadBlock(index);

    ICachedBlock ILanguageModel.LoadCachedBlock(int index) => LoadBlock(index);

    public IEnumerable<(string Name, Tensor Tensor)> OuterTensors(ScalarType dtype)
    {
        yield return (Prefix + "embed_tokens.weight", _embedTokens.to(dtype));
        yield return (Prefix + "norm.weight", _norm.to(dtype));
        if (_lmHead is not null) yield return ("lm_head.weight", _lmHead.to(dtype));
    }

    long BlockParameters(int i) => Qwen3Block.Tensors(Config, i).Sum(t => t.Shape.Aggregate(1L, (x, y) => x * y));

    public long ParameterCount()
    {
        var c = Config;
        long n = (long)c.VocabSize * c.Hidden * (c.TieWordEmbeddings ? 1 : 2) + c.Hidden;
        for (int i = 0; i < c.Layers; i++) n += BlockParameters(i);
        return n;
    }

    public JsonObject PrunedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        DecoderWidths.WritePruned(cfg, kept, Config.QueriesPerKv, Config.HeadDim);
        DecoderWidths.SetBiasFlag(cfg, kept, 0, "attention_bias");
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    public string? NotStockLoadable(IReadOnlyList<KeptBlock> kept) =>
        DecoderWidths.NotUniform(kept, "qwen3", "; llama.cpp's qwen3 reads one width too");

    public JsonObject PaddedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        DecoderWidths.RemovePruned(cfg);
        DecoderWidths.SetBiasFlag(cfg, kept, 0, "attention_bias");
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    /// <summary>Qwen3's byte-level BPE, through the HF tokenizers library (vocab.json + merges.txt alone lack its pre-tokenizer and added tokens).</summary>
    public ITextTokenizer Tokenizer()
    {
        string path = Path.Combine(ModelDir, "tokenizer.json");
        if (!File.Exists(path)) throw new LlmSnpException($"{ModelDir}: no tokenizer.json (Qwen3's byte-level BPE tokenizer)");
        return HfTokenizer.Load(path);
    }

    IEnumerable<(string Name, long[] Shape)> ExpectedTensors()
    {
        var c = Config;
        yield return (Prefix + "embed_tokens.weight", new long[] { c.VocabSize, c.Hidden });
        yield return (Prefix + "norm.weight", new long[] { c.Hidden });
        if (!c.TieWordEmbeddings) yield return ("lm_head.weight", new long[] { c.VocabSize, c.Hidden });
        for (int i = 0; i < c.Layers; i++)
            foreach (var (name, shape) in Qwen3Block.Tensors(c, i)) yield return ($"{Prefix}layers.{i}.{name}", shape);
    }

    public JsonObject Describe()
    {
        var c = Config;
        return new JsonObject
        {
            ["family"] = Family, ["model_type"] = "qwen3",
            ["dtype"] = SafeDTypes.ConfigName(StoredDType),
            ["parameters"] = ParameterCount(),
            ["pruned"] = c.Pruned,
            ["layers"] = c.Layers, ["hidden_size"] = c.Hidden, ["head_dim"] = c.HeadDim,
            ["queries_per_kv_head"] = c.QueriesPerKv,
            ["vocab_size"] = c.VocabSize, ["max_position_embeddings"] = c.MaxPositions,
            ["rope_theta"] = c.RopeTheta, ["rope_scaling"] = c.Rope.Type, ["rms_norm_eps"] = c.RmsNormEps,
            ["attention_bias"] = c.AttentionBias,
            ["tie_word_embeddings"] = c.TieWordEmbeddings,
            ["per_layer"] = new JsonArray(Enumerable.Range(0, c.Layers).Select(i => (JsonNode)new JsonObject
            {
                ["heads"] = c.Widths.Heads[i], ["kv_heads"] = c.Widths.KvHeads[i], ["intermediate_size"] = c.Widths.Intermediate[i],
                ["sliding_window"] = c.Windows[i], ["parameters"] = BlockParameters(i),
            }).ToArray()),
        };
    }

    public override void Dispose()
    {
        _rope?.Dispose();
        base.Dispose();
    }
}
