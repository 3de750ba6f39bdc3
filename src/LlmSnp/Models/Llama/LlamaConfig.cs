using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>
/// The fields of a Llama / Mistral / Qwen2 config.json the forward depends on (docs/models.md,
/// "LLaMA family"). Per-layer widths of a pruned checkpoint come from its lists; a uniform prune
/// stores them in the stock fields, which is what a stock class reads.
/// </summary>
public sealed class LlamaConfig : IDecoderConfig
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
    public bool TieWordEmbeddings { get; private set; }

    /// <summary>
    /// The checkpoint stores a head distinct from the embedding under a tying config: it is used untied, as
    /// transformers loads it, and every config written from this one says so.
    /// </summary>
    public void Untie()
    {
        TieWordEmbeddings = false;
        File.Json["tie_word_embeddings"] = false;
    }
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
        double eps = f.Double("rms_norm_eps", 1e-6), theta = f.Double("rope_theta", 10000.0);
        if (!(eps > 0) || !double.IsFinite(eps)) throw f.Unsupported("rms_norm_eps", $"is {eps}; must be a positive number");
        if (!(theta > 0) || !double.IsFinite(theta)) throw f.Unsupported("rope_theta", $"is {theta}; must be a positive number");
        return new LlamaConfig
        {
            File = f, ModelType = type,
            VocabSize = f.Int("vocab_size"), Hidden = hidden, Layers = layers, Heads = heads, KvHeads = kv, HeadDim = headDim,
            Intermediate = inter,
            RmsNormEps = eps,
            RopeTheta = theta,
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
