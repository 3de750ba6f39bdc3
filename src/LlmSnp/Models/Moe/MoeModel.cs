using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// A sparse mixture-of-experts causal LM (Mixtral, Qwen3-MoE; docs/models.md), streamed like LLaMA: the embedding,
/// final norm and head stay loaded, each decoder layer (attention + router + experts, about 1.2 GB for
/// Qwen3-30B-A3B in BF16) is read when it is needed. The family's config parser says the names and fields.
/// </summary>
public sealed class MoeModel : DecoderModel<MoeConfig>, ILanguageModel, IMixtureModel
{
    public string Family { get; }
    public int Experts => Config.Sparse.Any(s => s) ? Config.Experts : 0;
    public int TopK => Config.TopK;
    public string ExpertsField => Config.ExpertsField;

    readonly Rope _rope;

    /// <param name="family">The family's name in reports (mixtral, qwen3_moe).</param>
    /// <param name="config">Read before the weights are opened, so config errors come first.</param>
    public MoeModel(string family, string modelDir, MoeConfig config, Device? device = null, ScalarType computeDType = ScalarType.Float32)
        : base(modelDir, config, device, computeDType, "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
    {
        Family = family;
        try
        {
            var c = Config;
            OpenOuterTensors();
            CheckNoExtraExperts(modelDir);
            _rope = new Rope(c.Rope.InverseFrequencies(c.HeadDim, c.RopeTheta), c.MaxPositions, ComputeDType, Device);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>Stored experts past the configured count would be silently dropped (and the router sized for fewer): refuse.</summary>
    void CheckNoExtraExperts(string modelDir)
    {
        var re = new Regex(@"^model\.layers\.(\d+)\." + Regex.Escape(Config.Names.Experts) + @"\.(\d+)\.");
        foreach (var name in UnusedTensors)
        {
            var m = re.Match(name);
            if (!m.Success) continue;
            int layer = int.Parse(m.Groups[1].Value);
            string what = Config.Sparse[layer] ? $"{Config.ExpertsField} is {Config.Experts}" : $"layer {layer} is dense (no experts)";
            throw new LlmSnpException($"{Path.Combine(modelDir, "config.json")}: {what}, but the checkpoint has tensor '{name}'");
        }
    }

    /// <summary>Layer i's tensors (local names) and shapes for its widths, in HF module order.</summary>
    public override IEnumerable<(string Name, long[] Shape)> BlockTensors(int i)
    {
        var c = Config;
        long h = c.Hidden, q = (long)c.HeadsPerLayer[i] * c.HeadDim, kv = (long)c.KvHeadsPerLayer[i] * c.HeadDim;
        foreach (var (name, rows, cols) in new[] { ("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, q) })
        {
            yield return (name + ".weight", new[] { rows, cols });
            if (c.AttentionBias) yield return (name + ".bias", new[] { rows });
        }
        if (c.QkNorm)
        {
            yield return ("self_attn.q_norm.weight", new long[] { c.HeadDim });
            yield return ("self_attn.k_norm.weight", new long[] { c.HeadDim });
        }
        var n = c.Names;
        if (c.Sparse[i])
        {
            yield return (n.Router + ".weight", new long[] { c.Experts, h });
            for (int e = 0; e < c.Experts; e++)
            {
                long f = c.ExpertWidths[i][e];
                string x = $"{n.Experts}.{e}.";
                yield return (x + n.Gate + ".weight", new[] { f, h });
                yield return (x + n.Up + ".weight", new[] { f, h });
                yield return (x + n.Down + ".weight", new[] { h, f });
            }
        }
        else
        {
            long f = c.DenseWidths[i];
            yield return (n.DenseMlp + ".gate_proj.weight", new[] { f, h });
            yield return (n.DenseMlp + ".up_proj.weight", new[] { f, h });
            yield return (n.DenseMlp + ".down_proj.weight", new[] { h, f });
        }
        yield return ("input_layernorm.weight", new[] { h });
        yield return ("post_attention_layernorm.weight", new[] { h });
    }

    /// <summary>
    /// Why a consumer bias cannot be added, per node layer (0: o_proj; else an expert's or the dense MLP's down
    /// projection): the stock classes have none (Mixtral's attention and experts, Qwen3-MoE's MLPs), and llama.cpp's
    /// qwen3moe reads no attention output bias, so a Qwen3-MoE reconstruction stays bias-free there too.
    /// </summary>
    string? NoConsumerBias(int layer) => layer == 0
        ? (Config.ModelType == "mixtral" ? "stock mixtral o_proj has no bias" : "llama.cpp's qwen3moe has no attention output bias")
        : $"stock {Config.ModelType} experts and MLPs have no down_proj bias";

    public MoeBlock LoadBlock(int i)
    {
        string prefix = $"{Prefix}layers.{i}.";
        var w = PrunableBlock.ReadAll(w => { foreach (var (name, shape) in BlockTensors(i)) w[prefix + name] = ReadAs(prefix + name, ComputeDType, shape); });
        return new MoeBlock(prefix, i, Config, _rope, w, NoConsumerBias) { Recycler = Checkpoint.Recycle };
    }

    protected override Tensor FinalNorm(Tensor h, Tensor weight) => Norms.Rms(h, weight, Config.RmsNormEps);

    IPrunableBlock IPrunableModel.LoadBlock(int index) => LoadBlock(index);

    ICachedBlock ILanguageModel.LoadCachedBlock(int index) => LoadBlock(index);

    public long ActiveParameterCount()
    {
        var c = Config;
        long n = ParameterCount();
        for (int i = 0; i < c.Layers; i++)
        {
            if (!c.Sparse[i]) continue;
            long per(int e) => 3L * c.ExpertWidths[i][e] * c.Hidden;
            long all = Enumerable.Range(0, c.Experts).Sum(per);
            n += (long)Math.Round((double)all / c.Experts * c.TopK) - all;
        }
        return n;
    }

    public JsonObject PrunedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var c = Config;
        var cfg = (JsonObject)c.File.Json.DeepClone();
        var kv = kept.Select(k => k.Groups[0].Length).ToArray();
        var heads = kv.Select(g => g * c.QueriesPerKv).ToArray();
        cfg["pruned"] = true;
        cfg["head_dim"] = c.HeadDim;   // explicit: hidden / heads no longer gives it
        cfg["num_heads_per_layer"] = Ints(heads);
        cfg["num_key_value_heads_per_layer"] = Ints(kv);
        if (kv.Distinct().Count() == 1)
        {
            cfg["num_attention_heads"] = heads[0];
            cfg["num_key_value_heads"] = kv[0];
        }
        var sparse = Enumerable.Range(0, c.Layers).Where(i => c.Sparse[i]).ToArray();
        var expertWidths = kept.Select((k, i) => c.Sparse[i] ? k.Groups.Skip(1).Select(g => g.Length).ToArray() : Array.Empty<int>()).ToArray();
        cfg["expert_intermediate_sizes"] = new JsonArray(expertWidths.Select(w => (JsonNode)Ints(w)).ToArray());
        if (sparse.Length > 0)
        {
            // Every sparse layer keeps the same number of experts (--experts-keep): the stock field holds it.
            var counts = sparse.Select(i => expertWidths[i].Length).Distinct().ToArray();
            if (counts.Length != 1) throw new InvalidOperationException("sparse layers keep different numbers of experts");
            cfg[c.ExpertsField] = counts[0];
            var widths = sparse.SelectMany(i => expertWidths[i]).Distinct().ToArray();
            if (widths.Length == 1) cfg[c.ExpertWidthField] = widths[0];
        }
        var denseLayers = Enumerable.Range(0, c.Layers).Where(i => !c.Sparse[i]).ToArray();
        if (c.DenseWidthField is string denseField && denseLayers.Length > 0)
        {
            // Dense layers' widths (a sparse layer's entry repeats them: the loader reads it only at dense layers).
            var widths = denseLayers.Select(i => kept[i].Groups[1].Length).Distinct().ToArray();
            int filler = widths.Length == 1 ? widths[0] : c.DenseWidth;
            cfg["intermediate_sizes"] = Ints(kept.Select((k, i) => c.Sparse[i] ? filler : k.Groups[1].Length));
            if (widths.Length == 1) cfg[denseField] = widths[0];
        }
        SetBiasFlag(cfg, kept);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    public string? NotStockLoadable(IReadOnlyList<KeptBlock> kept)
    {
        var c = Config;
        if (kept.Select(k => k.Groups[0].Length).Distinct().Count() > 1) return $"K/V groups differ across layers (stock {c.ModelType} has one num_key_value_heads)";
        var expertWidths = kept.Where((_, i) => c.Sparse[i]).SelectMany(k => k.Groups.Skip(1).Select(g => g.Length)).Distinct().Count();
        if (expertWidths > 1) return $"expert widths differ (stock {c.ModelType} has one {c.ExpertWidthField}; --uniform keeps it)";
        if (c.DenseWidthField is string f && kept.Where((_, i) => !c.Sparse[i]).Select(k => k.Groups[1].Length).Distinct().Count() > 1)
            return $"dense MLP widths differ across layers (stock {c.ModelType} has one {f})";
        if (kept.Any(k => k.ConsumerBias.Skip(1).Any(b => b))) return $"stock {c.ModelType} experts and MLPs have no down_proj bias";
        if (c.ModelType == "mixtral" && kept.Any(k => k.ConsumerBias[0])) return "stock mixtral o_proj has no bias";
        return null;
    }

    public JsonObject PaddedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        foreach (var k in new[] { "pruned", "expert_intermediate_sizes", "intermediate_sizes", "num_heads_per_layer", "num_key_value_heads_per_layer" }) cfg.Remove(k);
        SetBiasFlag(cfg, kept);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    /// <summary>An o_proj bias (only where the source had attention biases) keeps the stock flag on.</summary>
    static void SetBiasFlag(JsonObject cfg, IReadOnlyList<KeptBlock> kept)
    {
        if (kept.Any(k => k.ConsumerBias[0])) cfg["attention_bias"] = true;
    }

    static JsonArray Ints(IEnumerable<int> xs) => new(xs.Select(x => (JsonNode)x).ToArray());

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
            ["active_parameters"] = ActiveParameterCount(),
            ["pruned"] = c.Pruned,
            ["layers"] = c.Layers, ["hidden_size"] = c.Hidden, ["head_dim"] = c.HeadDim,
            ["queries_per_kv_head"] = c.QueriesPerKv,
            ["experts"] = c.Experts, ["experts_per_token"] = c.TopK, ["norm_topk_prob"] = c.NormTopK,
            ["vocab_size"] = c.VocabSize, ["max_position_embeddings"] = c.MaxPositions,
            ["rope_theta"] = c.RopeTheta, ["rope_scaling"] = c.Rope.Type, ["rms_norm_eps"] = c.RmsNormEps,
            ["sliding_window"] = c.SlidingWindow,
            ["tie_word_embeddings"] = c.TieWordEmbeddings,
            ["per_layer"] = new JsonArray(Enumerable.Range(0, c.Layers).Select(i => (JsonNode)new JsonObject
            {
                ["heads"] = c.HeadsPerLayer[i], ["kv_heads"] = c.KvHeadsPerLayer[i],
                ["experts"] = c.Sparse[i] ? c.Experts : 0,
                ["expert_intermediate_sizes"] = c.Sparse[i] ? Ints(c.ExpertWidths[i]) : null,
                ["intermediate_size"] = c.Sparse[i] ? null : c.DenseWidths[i],
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
