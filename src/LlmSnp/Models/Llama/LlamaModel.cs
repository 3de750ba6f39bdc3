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
public sealed class LlamaModel : DecoderModel<LlamaConfig>, ILanguageModel
{
    public string Family => "llama";
    readonly Rope _rope;

    public LlamaModel(string modelDir, Device? device = null, ScalarType computeDType = ScalarType.Float32)
        : this(modelDir, LlamaConfig.From(ConfigFile.Load(modelDir)), device, computeDType) { }

    /// <summary>The config is read first: its errors come before the weights are opened.</summary>
    LlamaModel(string modelDir, LlamaConfig config, Device? device, ScalarType computeDType)
        : base(modelDir, config, device, computeDType, "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
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

    /// <summary>The layer's tensors (local names) and shapes for its widths, in HF module order.</summary>
    public override IEnumerable<(string Name, long[] Shape)> BlockTensors(int i)
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

    protected override Tensor FinalNorm(Tensor h, Tensor weight) => Norms.Rms(h, weight, Config.RmsNormEps);

    IPrunableBlock IPrunableModel.LoadBlock(int index) => LoadBlock(index);

    ICachedBlock ILanguageModel.LoadCachedBlock(int index) => LoadBlock(index);

    public JsonObject PrunedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        DecoderWidths.WritePruned(cfg, kept, Config.QueriesPerKv, Config.HeadDim);
        SetBiasFlags(cfg, kept);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    public string? NotStockLoadable(IReadOnlyList<KeptBlock> kept)
    {
        var c = Config;
        if (DecoderWidths.NotUniform(kept, c.ModelType, "; export gguf writes them as arch deci") is string widths) return widths;
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
        DecoderWidths.RemovePruned(cfg);
        SetBiasFlags(cfg, kept);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    /// <summary>A reconstruction that added consumer biases turns on the flags that make the stock class hold them.</summary>
    static void SetBiasFlags(JsonObject cfg, IReadOnlyList<KeptBlock> kept)
    {
        DecoderWidths.SetBiasFlag(cfg, kept, 0, "attention_bias");
        DecoderWidths.SetBiasFlag(cfg, kept, 1, "mlp_bias");
    }

    public ITextTokenizer Tokenizer() => TextTokenizers.ForModel(ModelDir);

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
