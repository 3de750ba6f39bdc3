using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// Gemma 2 and Gemma 3 (text) causal LMs (HF `Gemma2ForCausalLM`, `Gemma3ForCausalLM`; docs/models.md), streamed block by
/// block: embeddings × √hidden, the decoder layers, a final (1 + w) RMSNorm, the (tied) head and, Gemma 2, the final
/// logit soft-cap.
/// </summary>
public sealed class GemmaModel : DecoderModel<GemmaConfig>, ILanguageModel
{
    public string Family => "gemma";
    readonly double _embedScale;
    /// <summary>Full-attention layers' RoPE (every layer in Gemma 2) and Gemma 3's local one for sliding layers.</summary>
    readonly Rope _globalRope;
    readonly Rope? _localRope;

    public GemmaModel(string modelDir, Device? device = null, ScalarType computeDType = ScalarType.Float32)
        : this(modelDir, GemmaConfig.From(ConfigFile.Load(modelDir)), device, computeDType) { }

    /// <summary>The config is read first: its errors come before the weights are opened.</summary>
    GemmaModel(string modelDir, GemmaConfig config, Device? device, ScalarType computeDType)
        : base(modelDir, config, device, computeDType, "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "generation_config.json")
    {
        try
        {
            var c = Config;
            OpenOuterTensors();
            // HF multiplies by √hidden as a tensor of the activations' dtype (√3072 = 55.4256 is 55.5 in BF16).
            using (var exact = torch.tensor(Math.Sqrt(c.Hidden), ScalarType.Float64))
            using (var rounded = exact.to(ComputeDType)) _embedScale = rounded.to(ScalarType.Float64).item<double>();
            _globalRope = new Rope(c.Rope.InverseFrequencies(c.HeadDim, c.RopeTheta), c.MaxPositions, ComputeDType, Device);
            if (c.Gemma3 && c.Sliding.Contains(true))
                _localRope = new Rope(Enumerable.Range(0, c.HeadDim / 2).Select(i => 1.0 / Math.Pow(c.RopeLocalTheta, 2.0 * i / c.HeadDim)).ToArray(),
                    c.MaxPositions, ComputeDType, Device);   // unscaled: rope_scaling applies to the full-attention layers only
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    public GemmaBlock LoadBlock(int i)
    {
        string prefix = $"{Prefix}layers.{i}.";
        var w = PrunableBlock.ReadAll(w => { foreach (var (name, shape) in BlockTensors(i)) w[prefix + name] = ReadAs(prefix + name, ComputeDType, shape); });
        var rope = Config.Sliding[i] && _localRope is not null ? _localRope : _globalRope;
        return new GemmaBlock(prefix, i, Config, rope, w) { Recycler = Checkpoint.Recycle };
    }

    public override IEnumerable<(string Name, long[] Shape)> BlockTensors(int i) => GemmaBlock.Tensors(Config, i);

    protected override Tensor FinalNorm(Tensor h, Tensor weight) => Norms.GemmaRms(h, weight, Config.RmsNormEps);

    protected override Tensor ScaleEmbeddings(Tensor rows) => rows.mul_(_embedScale);

    protected override Tensor CapLogits(Tensor logits) => Config.FinalSoftcap is double c ? logits.div_(c).tanh_().mul_(c) : logits;

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
        DecoderWidths.NotUniform(kept, Config.ModelType, $"; llama.cpp's {(Config.Gemma3 ? "gemma3" : "gemma2")} reads one width too");

    public JsonObject PaddedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        DecoderWidths.RemovePruned(cfg);
        DecoderWidths.SetBiasFlag(cfg, kept, 0, "attention_bias");
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    public ITextTokenizer Tokenizer() => TextTokenizers.ForModel(ModelDir);

    public JsonObject Describe()
    {
        var c = Config;
        return new JsonObject
        {
            ["family"] = Family, ["model_type"] = c.ModelType,
            ["dtype"] = SafeDTypes.ConfigName(StoredDType),
            ["parameters"] = ParameterCount(),
            ["pruned"] = c.Pruned,
            ["layers"] = c.Layers, ["hidden_size"] = c.Hidden, ["head_dim"] = c.HeadDim,
            ["queries_per_kv_head"] = c.QueriesPerKv,
            ["vocab_size"] = c.VocabSize, ["max_position_embeddings"] = c.MaxPositions,
            ["rope_theta"] = c.RopeTheta, ["rope_scaling"] = c.Rope.Type, ["rope_local_base_freq"] = c.Gemma3 ? c.RopeLocalTheta : null,
            ["rms_norm_eps"] = c.RmsNormEps, ["query_pre_attn_scalar"] = c.QueryPreAttnScalar,
            ["attn_logit_softcapping"] = c.AttnSoftcap, ["final_logit_softcapping"] = c.FinalSoftcap,
            ["sliding_window"] = c.SlidingWindow, ["hidden_activation"] = c.Activation,
            ["tie_word_embeddings"] = c.TieWordEmbeddings,
            ["per_layer"] = new JsonArray(Enumerable.Range(0, c.Layers).Select(i => (JsonNode)new JsonObject
            {
                ["heads"] = c.Widths.Heads[i], ["kv_heads"] = c.Widths.KvHeads[i], ["intermediate_size"] = c.Widths.Intermediate[i],
                ["attention"] = c.Sliding[i] ? "sliding" : "full", ["parameters"] = BlockParameters(i),
            }).ToArray()),
        };
    }

    public override void Dispose()
    {
        _globalRope?.Dispose();
        _localRope?.Dispose();
        base.Dispose();
    }
}
