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
public sealed class Qwen3Model : DecoderModel<Qwen3Config>, ILanguageModel
{
    public string Family => "qwen3";
    readonly Rope _rope;

    public Qwen3Model(string modelDir, Device? device = null, ScalarType computeDType = ScalarType.Float32)
        : this(modelDir, Qwen3Config.From(ConfigFile.Load(modelDir)), device, computeDType) { }

    /// <summary>The config is read first: its errors come before the weights are opened.</summary>
    Qwen3Model(string modelDir, Qwen3Config config, Device? device, ScalarType computeDType)
        : base(modelDir, config, device, computeDType, "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
            "added_tokens.json", "generation_config.json")
    {
        try
        {
            var c = Config;
            OpenOuterTensors();
            _rope = new Rope(c.Rope.InverseFrequencies(c.HeadDim, c.RopeTheta), c.MaxPositions, ComputeDType, Device);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    public Qwen3Block LoadBlock(int i)
    {
        string prefix = $"{Prefix}layers.{i}.";
        var w = PrunableBlock.ReadAll(w => { foreach (var (name, shape) in BlockTensors(i)) w[prefix + name] = ReadAs(prefix + name, ComputeDType, shape); });
        return new Qwen3Block(prefix, i, Config, _rope, w) { Recycler = Checkpoint.Recycle };
    }

    public override IEnumerable<(string Name, long[] Shape)> BlockTensors(int i) => Qwen3Block.Tensors(Config, i);

    protected override Tensor FinalNorm(Tensor h, Tensor weight) => Norms.Rms(h, weight, Config.RmsNormEps);

    IPrunableBlock IPrunableModel.LoadBlock(int index) => LoadBlock(index);

    ICachedBlock ILanguageModel.LoadCachedBlock(int index) => LoadBlock(index);

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
