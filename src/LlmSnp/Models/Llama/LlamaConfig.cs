using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>
/// The fields of a Llama / Mistral / Qwen2 config.json the forward depends on (docs/models.md,
/// "LLaMA family"). Per-layer widths of a pruned checkpoint come from its lists; a uniform prune
/// stores them in the stock fields, which is what a stock class reads.
/// </summary>
public sealed class LlamaConfig
{
    public static readonly string[] ModelTypes = { "llama", "mistral", "qwen2" };

    public required ConfigFile File { get; init; }
    public required string ModelType { get; init; }
    public int VocabSize { get; init; }
    public int Hidden { get; init; }
    public int Layers { get; init; }
    public int Heads { get; init; }
    public int KvHeads { get; init; }
    public int HeadDim { get; init; }
    public int Intermediate { get; init; }
    public double RmsNormEps { get; init; }
    public double RopeTheta { get; init; }
    public required RopeScaling Rope { get; init; }
    public int MaxPositions { get; init; }
    /// <summary>q/k/v (and o) projections have biases; Qwen2's q/k/v always do.</summary>
    public bool QkvBias { get; init; }
    public bool OBias { get; init; }
    public bool MlpBias { get; init; }
    public bool TieWordEmbeddings { get; init; }
    /// <summary>Mistral's sliding attention window (null: full causal attention).</summary>
    public int? SlidingWindow { get; init; }
    public required int[] IntermediateSizes { get; init; }
    public required int[] HeadsPerLayer { get; init; }
    public required int[] KvHeadsPerLayer { get; init; }
    public bool Pruned { get; init; }
    public int? BosId { get; init; }
    public int? EosId { get; init; }

    public static LlamaConfig From(ConfigFile f)
    {
        string type = f.ModelType;
        if (!ModelTypes.Contains(type)) throw new LlmSnpException($"{f.Path}: model_type '{type}' is not llama, mistral or qwen2");
        int hidden = f.Int("hidden_size"), heads = f.Int("num_attention_heads"), layers = f.Layers();
        int kv = f.Int("num_key_value_heads", heads);
        if (heads % kv != 0) throw f.Unsupported("num_key_value_heads", $"({kv}) does not divide num_attention_heads ({heads})");
        int headDim;
        if (f.Has("head_dim")) headDim = f.Int("head_dim");
        else if (hidden % heads != 0) throw f.Unsupported("num_attention_heads", $"({heads}) does not divide hidden_size ({hidden}) and no head_dim is given");
        else headDim = hidden / heads;
        if (headDim % 2 != 0) throw f.Unsupported("head_dim", $"is {headDim}; rotary embeddings need an even head_dim");
        string act = f.Has("hidden_act") ? f.String("hidden_act") : "silu";
        if (act != "silu") throw f.Unsupported("hidden_act", $"is '{act}'; only silu is supported");
        int inter = f.Int("intermediate_size");
        int maxPos = f.Int("max_position_embeddings", 2048);
        bool qwen = type == "qwen2";
        bool attnBias = f.Bool("attention_bias", false);
        if (qwen && f.Bool("use_sliding_window", false)) throw f.Unsupported("use_sliding_window", "is true; Qwen2's per-layer sliding window is not supported");
        int? window = null;
        if (type == "mistral" && f.Json["sliding_window"] is JsonNode) window = f.Int("sliding_window");
        var headsPerLayer = f.IntList("num_heads_per_layer", layers) ?? Enumerable.Repeat(heads, layers).ToArray();
        var kvPerLayer = f.IntList("num_key_value_heads_per_layer", layers) ?? Enumerable.Repeat(kv, layers).ToArray();
        for (int i = 0; i < layers; i++)
            if (headsPerLayer[i] % kvPerLayer[i] != 0 || headsPerLayer[i] / kvPerLayer[i] != heads / kv)
                throw f.Unsupported("num_heads_per_layer", $"[{i}] = {headsPerLayer[i]} with {kvPerLayer[i]} K/V heads: every layer must keep {heads / kv} query heads per K/V head");
        return new LlamaConfig
        {
            File = f, ModelType = type,
            VocabSize = f.Int("vocab_size"), Hidden = hidden, Layers = layers, Heads = heads, KvHeads = kv, HeadDim = headDim,
            Intermediate = inter,
            RmsNormEps = f.Double("rms_norm_eps", 1e-6),
            RopeTheta = f.Double("rope_theta", 10000.0),
            Rope = RopeScaling.From(f, maxPos),
            MaxPositions = maxPos,
            // Qwen2's q/k/v biases are always on; its o_proj bias exists only where pruning added one.
            QkvBias = qwen || attnBias, OBias = attnBias, MlpBias = f.Bool("mlp_bias", false),
            TieWordEmbeddings = f.Bool("tie_word_embeddings", false),
            SlidingWindow = window,
            IntermediateSizes = f.IntList("intermediate_sizes", layers) ?? Enumerable.Repeat(inter, layers).ToArray(),
            HeadsPerLayer = headsPerLayer, KvHeadsPerLayer = kvPerLayer,
            Pruned = f.Bool("pruned", false),
            BosId = f.Json["bos_token_id"] is JsonValue ? f.Int("bos_token_id", min: 0) : null,
            EosId = f.Json["eos_token_id"] is JsonValue ? f.Int("eos_token_id", min: 0) : null,
        };
    }

    /// <summary>
    /// Why the stock HF class cannot hold a bias added to node layer <paramref name="nodeLayer"/>'s consumer (0: o_proj,
    /// 1: down_proj), or null where it can: Llama through `attention_bias` / `mlp_bias`; Mistral's attention and MLP and
    /// Qwen2's o_proj and MLP are built with bias=False whatever the config says.
    /// </summary>
    public string? NoConsumerBias(int nodeLayer) => (ModelType, nodeLayer) switch
    {
        ("llama", _) => null,
        (_, 0) => $"stock {ModelType} o_proj has no bias",
        _ => $"stock {ModelType} down_proj has no bias",
    };

    /// <summary>Query heads per K/V head (the size of an attention unit, in heads).</summary>
    public int QueriesPerKv => Heads / KvHeads;
}

/// <summary>`rope_scaling`: none, `linear` or `llama3` (HF `modeling_rope_utils`); any other type is refused.</summary>
public sealed record RopeScaling(string Type, double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositions)
{
    public static RopeScaling From(ConfigFile f, int maxPositions)
    {
        if (f.Json["rope_scaling"] is not JsonObject rs) return new RopeScaling("default", 1, 1, 1, maxPositions);
        string type = rs["rope_type"] is JsonValue rt && rt.TryGetValue<string>(out var t1) ? t1
            : rs["type"] is JsonValue ty && ty.TryGetValue<string>(out var t2) ? t2
            : throw f.Unsupported("rope_scaling", "has no rope_type");
        double Num(string field, double? fallback = null)
        {
            var n = rs[field];
            if (n is JsonValue v && v.TryGetValue<double>(out var d)) return d;
            if (n == null && fallback is double x) return x;
            throw f.Unsupported("rope_scaling", $"field '{field}' is missing or not a number");
        }
        return type switch
        {
            "default" => new RopeScaling("default", 1, 1, 1, maxPositions),
            "linear" => new RopeScaling("linear", Num("factor"), 1, 1, maxPositions),
            "llama3" => new RopeScaling("llama3", Num("factor"), Num("low_freq_factor"), Num("high_freq_factor"),
                (int)Num("original_max_position_embeddings")),
            _ => throw f.Unsupported("rope_scaling", $"type '{type}' is not supported (linear, llama3)"),
        };
    }

    /// <summary>Inverse frequencies θ^(−2i/d), scaled as the type says, in float64.</summary>
    public double[] InverseFrequencies(int headDim, double theta)
    {
        var inv = Enumerable.Range(0, headDim / 2).Select(i => 1.0 / Math.Pow(theta, 2.0 * i / headDim)).ToArray();
        switch (Type)
        {
            case "linear":
                return inv.Select(x => x / Factor).ToArray();
            case "llama3":
                {
                    double lowWavelen = OriginalMaxPositions / LowFreqFactor, highWavelen = OriginalMaxPositions / HighFreqFactor;
                    return inv.Select(x =>
                    {
                        double wavelen = 2 * Math.PI / x;
                        if (wavelen < highWavelen) return x;               // high frequencies: unchanged
                        if (wavelen > lowWavelen) return x / Factor;       // low frequencies: scaled
                        double smooth = (OriginalMaxPositions / wavelen - LowFreqFactor) / (HighFreqFactor - LowFreqFactor);
                        return (1 - smooth) * x / Factor + smooth * x;
                    }).ToArray();
                }
            default:
                return inv;
        }
    }
}
