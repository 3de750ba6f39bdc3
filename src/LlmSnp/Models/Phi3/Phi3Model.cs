using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// Phi-3 / Phi-3.5 / Phi-4-mini causal LMs (HF `modeling_phi3` semantics, docs/models.md), streamed like LLaMA: the
/// embedding, final norm and head stay loaded, each decoder layer is read when it is needed.
/// </summary>
public sealed class Phi3Model : DecoderModel<Phi3Config>, ILanguageModel
{
    public string Family => "phi3";

    /// <summary>
    /// longrope's tables switch once a sequence passes original_max_position_embeddings: HF 4.48's
    /// `Phi3ForCausalLM.prepare_inputs_for_generation` then drops the cache and recomputes it with the long factors.
    /// </summary>
    public int? RecomputeCachePast => Config.Rope.Type == "longrope" ? Config.Rope.OriginalMaxPositions : null;

    readonly Rope _rope;

    public Phi3Model(string modelDir, Device? device = null, ScalarType computeDType = ScalarType.Float32)
        : this(modelDir, Phi3Config.From(ConfigFile.Load(modelDir)), device, computeDType) { }

    /// <summary>The config is read first: its errors come before the weights are opened.</summary>
    Phi3Model(string modelDir, Phi3Config config, Device? device, ScalarType computeDType)
        : base(modelDir, config, device, computeDType, "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt")
    {
        try
        {
            var c = Config;
            CheckFusedRows();   // before the layout check: its line names the fields that give the rows
            OpenOuterTensors();
            _rope = c.Rope.Build(c.RotaryDim, c.RopeTheta, c.MaxPositions, ComputeDType, Device);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>A fused tensor whose rows disagree with the config is named with the config fields that give its rows.</summary>
    void CheckFusedRows()
    {
        for (int i = 0; i < Config.Layers; i++)
        {
            var (qkv, qkvWhy, gateUp, gateUpWhy) = Config.Fused(i);
            foreach (var (name, rows, why) in new[] { ("self_attn.qkv_proj.weight", qkv.Sum(), qkvWhy), ("mlp.gate_up_proj.weight", gateUp.Sum(), gateUpWhy) })
            {
                string full = $"{Prefix}layers.{i}.{name}";
                if (!Checkpoint.Has(full)) continue;   // missing: CheckpointLayout names it
                var shape = Checkpoint.Entry(full).Shape;
                if (shape.Length == 2 && shape[0] != rows)
                    throw new LlmSnpException($"{ModelDir}: tensor '{full}' has {shape[0]} rows; config.json gives {why}");
            }
        }
    }

    protected override Tensor FinalNorm(Tensor h, Tensor weight) => Norms.Rms(h, weight, Config.RmsNormEps);

    /// <summary>The layer's tensors (local names) and shapes for its widths, in HF module order. Phi-3 has no biases.</summary>
    public override IEnumerable<(string Name, long[] Shape)> BlockTensors(int i)
    {
        var c = Config;
        var (qkv, _, gateUp, _) = c.Fused(i);
        long h = c.Hidden, q = qkv[0], f = gateUp[0];
        yield return ("self_attn.o_proj.weight", new[] { h, q });
        yield return ("self_attn.qkv_proj.weight", new[] { qkv.Sum(), h });
        yield return ("mlp.gate_up_proj.weight", new[] { gateUp.Sum(), h });
        yield return ("mlp.down_proj.weight", new[] { h, f });
        yield return ("input_layernorm.weight", new[] { h });
        yield return ("post_attention_layernorm.weight", new[] { h });
    }

    public Phi3Block LoadBlock(int i)
    {
        var c = Config;
        string prefix = $"{Prefix}layers.{i}.";
        var (qkv, _, gateUp, _) = c.Fused(i);
        var w = PrunableBlock.ReadAll(w => { foreach (var (name, shape) in BlockTensors(i)) w[prefix + name] = ReadAs(prefix + name, ComputeDType, shape); });
        return new Phi3Block(prefix, i, c.HeadDim, c.QueriesPerKv, c.RmsNormEps, _rope, c.SlidingWindow, qkv, gateUp, w) { Recycler = Checkpoint.Recycle };
    }

    IPrunableBlock IPrunableModel.LoadBlock(int index) => LoadBlock(index);

    ICachedBlock ILanguageModel.LoadCachedBlock(int index) => LoadBlock(index);

    /// <summary>Stock Phi3 has no biases to turn on: a consumer bias never reaches here (<see cref="Phi3Block.CanAddConsumerBias"/>).</summary>
    public JsonObject PrunedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        if (kept.Any(k => k.ConsumerBias.Any(b => b))) throw new InvalidOperationException("a phi3 consumer gained a bias the stock class cannot hold");
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        DecoderWidths.WritePruned(cfg, kept, Config.QueriesPerKv, Config.HeadDim);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    public string? NotStockLoadable(IReadOnlyList<KeptBlock> kept)
    {
        var c = Config;
        if (DecoderWidths.NotUniform(kept, "phi3", "; llama.cpp's phi3 reads one width too") is string why) return why;
        // Phi3Config checks longrope's factor lists against hidden_size // num_attention_heads (× partial_rotary_factor) / 2,
        // not head_dim: with heads removed the lists no longer fit that count.
        if (c.Rope.Type == "longrope")
        {
            int heads = kept[0].Groups[0].Length * c.QueriesPerKv;
            int stockRotary = (int)(c.Hidden / heads * c.PartialRotaryFactor);
            if (stockRotary / 2 != c.Rope.ShortFactor!.Count)
                return $"stock Phi3Config requires rope_scaling's factor lists to have hidden_size // num_attention_heads × partial_rotary_factor / 2 = {stockRotary / 2} entries with {heads} heads; they have {c.Rope.ShortFactor.Count}";
        }
        return null;
    }

    public JsonObject PaddedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        DecoderWidths.RemovePruned(cfg);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    /// <summary>
    /// Phi-3's SentencePiece `tokenizer.model`, else the byte-level BPE `tokenizer.json` (Phi-4-mini; its vocab.json +
    /// merges.txt alone lack its pre-tokenizer and added tokens).
    /// </summary>
    public ITextTokenizer Tokenizer()
    {
        string json = Path.Combine(ModelDir, "tokenizer.json");
        return !File.Exists(Path.Combine(ModelDir, "tokenizer.model")) && File.Exists(json) ? HfTokenizer.Load(json, ModelDir) : TextTokenizers.ForModel(ModelDir);
    }

    public JsonObject Describe()
    {
        var c = Config;
        return new JsonObject
        {
            ["family"] = Family,
            ["model_type"] = "phi3",
            ["dtype"] = SafeDTypes.ConfigName(StoredDType),
            ["parameters"] = ParameterCount(),
            ["pruned"] = c.Pruned,
            ["layers"] = c.Layers, ["hidden_size"] = c.Hidden, ["head_dim"] = c.HeadDim, ["rotary_dim"] = c.RotaryDim,
            ["queries_per_kv_head"] = c.QueriesPerKv,
            ["vocab_size"] = c.VocabSize, ["max_position_embeddings"] = c.MaxPositions,
            ["original_max_position_embeddings"] = c.OriginalMaxPositions,
            ["rope_theta"] = c.RopeTheta, ["rope_scaling"] = c.Rope.Type, ["rms_norm_eps"] = c.RmsNormEps,
            ["sliding_window"] = c.SlidingWindow,
            ["tie_word_embeddings"] = c.TieWordEmbeddings,
            ["per_layer"] = new JsonArray(Enumerable.Range(0, c.Layers).Select(i => (JsonNode)new JsonObject
            {
                ["heads"] = c.Widths.Heads[i], ["kv_heads"] = c.Widths.KvHeads[i], ["intermediate_size"] = c.Widths.Intermediate[i],
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
