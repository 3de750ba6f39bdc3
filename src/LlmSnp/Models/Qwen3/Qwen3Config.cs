using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>
/// The fields of a Qwen3 config.json the forward depends on (HF `Qwen3Config`, docs/models.md "Qwen3"), with HF's
/// defaults where a field is absent: `head_dim` 128 (not hidden / heads), `num_key_value_heads` 32, θ 10000, untied.
/// Per-layer widths of a pruned checkpoint come from <see cref="DecoderWidths"/>.
/// </summary>
public sealed class Qwen3Config : IDecoderConfig
{
    public static readonly string[] ModelTypes = { "qwen3" };

    public required ConfigFile File { get; init; }
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
    /// <summary>`attention_bias`: q, k, v and o_proj all carry biases.</summary>
    public bool AttentionBias { get; init; }
    public bool TieWordEmbeddings { get; private set; }
    /// <summary>A tied config whose checkpoint stores a different head is untied, as transformers loads it.</summary>
    public void Untie()
    {
        TieWordEmbeddings = false;
        File.Json["tie_word_embeddings"] = false;
    }
    /// <summary>Per layer: the sliding window, or null for full causal attention.</summary>
    public required int?[] Windows { get; init; }
    public required DecoderWidths Widths { get; init; }
    public bool Pruned { get; init; }

    /// <summary>Query heads per K/V head (the size of an attention unit, in heads).</summary>
    public int QueriesPerKv => Heads / KvHeads;

    public static Qwen3Config From(ConfigFile f)
    {
        if (!ModelTypes.Contains(f.ModelType)) throw new LlmSnpException($"{f.Path}: model_type '{f.ModelType}' is not qwen3");
        // transformers 5 saves rope_theta / rope_scaling inside rope_parameters; reading only half of that layout would
        // silently change the rotary frequencies.
        if (f.Has("rope_parameters")) throw f.Unsupported("rope_parameters", "is the transformers 5 layout; LlmSnp reads rope_theta and rope_scaling");
        int hidden = f.Int("hidden_size"), heads = f.Int("num_attention_heads"), layers = f.Layers();
        int kv = f.Int("num_key_value_heads", 32);
        int headDim = f.Int("head_dim", 128);
        if (headDim % 2 != 0) throw f.Unsupported("head_dim", $"is {headDim}; rotary embeddings need an even head_dim");
        string act = f.Has("hidden_act") ? f.String("hidden_act") : "silu";
        if (act != "silu") throw f.Unsupported("hidden_act", $"is '{act}'; only silu is supported");
        int inter = f.Int("intermediate_size");
        int maxPos = f.Int("max_position_embeddings", 32768);
        double eps = f.Double("rms_norm_eps", 1e-6), theta = f.Double("rope_theta", 10000.0);
        if (!(eps > 0) || !double.IsFinite(eps)) throw f.Unsupported("rms_norm_eps", $"is {eps}; must be a positive number");
        if (!(theta > 0) || !double.IsFinite(theta)) throw f.Unsupported("rope_theta", $"is {theta}; must be a positive number");
        return new Qwen3Config
        {
            File = f,
            VocabSize = f.Int("vocab_size"), Hidden = hidden, Layers = layers, Heads = heads, KvHeads = kv, HeadDim = headDim,
            Intermediate = inter, RmsNormEps = eps, RopeTheta = theta, Rope = RopeScaling.From(f, maxPos), MaxPositions = maxPos,
            AttentionBias = f.Bool("attention_bias", false),
            TieWordEmbeddings = f.Bool("tie_word_embeddings", false),
            Windows = SlidingWindows(f, layers),
            Widths = DecoderWidths.From(f, layers, heads, kv, inter),
            Pruned = f.Bool("pruned", false),
        };
    }

    /// <summary>
    /// HF `Qwen3Config.layer_types` (given, or by default "sliding_attention" for layers ≥ `max_window_layers` when
    /// `use_sliding_window`); a sliding layer attends to the last `sliding_window` positions.
    /// </summary>
    static int?[] SlidingWindows(ConfigFile f, int layers)
    {
        bool use = f.Bool("use_sliding_window", false);
        bool[] sliding;
        if (f.Json["layer_types"] is JsonNode) sliding = f.SlidingLayerTypes(layers);
        else
        {
            int from = f.Int("max_window_layers", 28, min: 0);
            sliding = Enumerable.Range(0, layers).Select(i => use && i >= from).ToArray();
        }
        if (!sliding.Contains(true)) return new int?[layers];
        // HF sets sliding_window to None unless use_sliding_window: a sliding layer then has no window.
        int? window = use && f.Json["sliding_window"] is JsonNode ? f.Int("sliding_window") : null;
        return sliding.Select(s => s ? window : null).ToArray();
    }

    /// <summary>
    /// Why the stock class cannot hold a bias added to node layer <paramref name="nodeLayer"/>'s consumer, or null where
    /// it can: o_proj through `attention_bias` (which also gives q, k and v biases); `Qwen3MLP` has none.
    /// </summary>
    public static string? NoConsumerBias(int nodeLayer) => nodeLayer == 0 ? null : "stock qwen3 down_proj has no bias";
}
