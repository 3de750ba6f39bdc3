using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>
/// The fields of a Gemma 2 (`gemma2`) or Gemma 3 text (`gemma3_text`) config.json the forward depends on (HF
/// `Gemma2Config`, `Gemma3TextConfig`; docs/models.md "Gemma 2 and Gemma 3"), with HF's defaults where a field is
/// absent. The two differ in config only: Gemma 3 adds q/k norms, a local RoPE base for its sliding layers and a
/// sliding-window pattern, and drops the soft-caps by default.
/// </summary>
public sealed class GemmaConfig : IDecoderConfig
{
    public static readonly string[] ModelTypes = { "gemma2", "gemma3_text" };

    /// <summary>The multimodal Gemma 3 (vision tower + language model under other tensor names) is not read.</summary>
    public static readonly IReadOnlyDictionary<string, string> Refuses = new Dictionary<string, string>
    {
        ["gemma3"] = "is the multimodal Gemma 3 (Gemma3ForConditionalGeneration: a vision tower and a language model); LlmSnp prunes text-only Gemma 3 checkpoints (model_type gemma3_text, Gemma3ForCausalLM)",
    };

    public required ConfigFile File { get; init; }
    public required string ModelType { get; init; }
    public bool Gemma3 => ModelType == "gemma3_text";
    public int VocabSize { get; init; }
    public int Hidden { get; init; }
    public int Layers { get; init; }
    public int Heads { get; init; }
    public int KvHeads { get; init; }
    public int HeadDim { get; init; }
    public int Intermediate { get; init; }
    public double RmsNormEps { get; init; }
    /// <summary>RoPE base of the full-attention layers (every layer in Gemma 2), with <see cref="Rope"/>'s scaling.</summary>
    public double RopeTheta { get; init; }
    public required RopeScaling Rope { get; init; }
    /// <summary>Gemma 3's `rope_local_base_freq`: the base of the sliding layers, unscaled.</summary>
    public double RopeLocalTheta { get; init; }
    public int MaxPositions { get; init; }
    /// <summary>Attention scores are multiplied by query_pre_attn_scalar^−½ (not head_dim^−½).</summary>
    public double QueryPreAttnScalar { get; init; }
    public double? AttnSoftcap { get; init; }
    public double? FinalSoftcap { get; init; }
    /// <summary>Per layer: true for a sliding-window (local) layer.</summary>
    public required bool[] Sliding { get; init; }
    /// <summary>`sliding_window` (default 4096); an explicit null leaves the sliding layers unwindowed, as HF does.</summary>
    public int? SlidingWindow { get; init; }
    /// <summary>`hidden_activation`: the MLP's gate activation.</summary>
    public required string Activation { get; init; }
    public bool AttentionBias { get; init; }
    public bool TieWordEmbeddings { get; private set; }
    /// <summary>A tied config whose checkpoint stores a different head is untied, as transformers loads it.</summary>
    public void Untie()
    {
        TieWordEmbeddings = false;
        File.Json["tie_word_embeddings"] = false;
    }
    public required DecoderWidths Widths { get; init; }
    public bool Pruned { get; init; }

    public int QueriesPerKv => Heads / KvHeads;

    /// <summary>Layer i's attention window (null: full causal attention).</summary>
    public int? Window(int i) => Sliding[i] ? SlidingWindow : null;

    public static GemmaConfig From(ConfigFile f)
    {
        string type = f.ModelType;
        if (!ModelTypes.Contains(type)) throw new LlmSnpException($"{f.Path}: model_type '{type}' is not gemma2 or gemma3_text");
        bool g3 = type == "gemma3_text";
        if (f.Has("rope_parameters")) throw f.Unsupported("rope_parameters", "is the transformers 5 layout; LlmSnp reads rope_theta, rope_local_base_freq and rope_scaling");
        if (f.Bool("use_bidirectional_attention", false)) throw f.Unsupported("use_bidirectional_attention", "is true (an embedding model, not a causal LM)");
        int hidden = f.Int("hidden_size"), heads = f.Int("num_attention_heads"), layers = f.Layers();
        int kv = f.Int("num_key_value_heads", 4);
        int headDim = f.Int("head_dim", 256);
        if (headDim % 2 != 0) throw f.Unsupported("head_dim", $"is {headDim}; rotary embeddings need an even head_dim");
        // Gemma 2/3 read hidden_activation only (hidden_act, also present in hub configs, is ignored by their MLP).
        string act = f.Has("hidden_activation") ? f.String("hidden_activation") : "gelu_pytorch_tanh";
        if (act is not ("gelu_pytorch_tanh" or "gelu")) throw f.Unsupported("hidden_activation", $"is '{act}'; gelu_pytorch_tanh and gelu are supported");
        int inter = f.Int("intermediate_size");
        int maxPos = f.Int("max_position_embeddings", g3 ? 131072 : 8192);
        double eps = Positive(f, "rms_norm_eps", 1e-6);
        double theta = Positive(f, "rope_theta", g3 ? 1_000_000.0 : 10_000.0);
        double local = g3 ? Positive(f, "rope_local_base_freq", 10_000.0) : theta;
        double scalar = Positive(f, "query_pre_attn_scalar", 256);
        double? Cap(string field, double? fallback) => f.Json.ContainsKey(field) ? (f.Json[field] is null ? null : Positive(f, field, 0)) : fallback;
        var sliding = SlidingLayers(f, layers, g3);
        int? window = !f.Json.ContainsKey("sliding_window") ? 4096 : f.Json["sliding_window"] is null ? null : f.Int("sliding_window");
        return new GemmaConfig
        {
            File = f, ModelType = type,
            VocabSize = f.Int("vocab_size"), Hidden = hidden, Layers = layers, Heads = heads, KvHeads = kv, HeadDim = headDim,
            Intermediate = inter, RmsNormEps = eps, RopeTheta = theta, Rope = RopeScaling.From(f, maxPos), RopeLocalTheta = local,
            MaxPositions = maxPos, QueryPreAttnScalar = scalar,
            AttnSoftcap = Cap("attn_logit_softcapping", g3 ? null : 50.0),
            FinalSoftcap = Cap("final_logit_softcapping", g3 ? null : 30.0),
            Sliding = sliding, SlidingWindow = window, Activation = act,
            AttentionBias = f.Bool("attention_bias", false),
            TieWordEmbeddings = f.Bool("tie_word_embeddings", true),
            Widths = DecoderWidths.From(f, layers, heads, kv, inter),
            Pruned = f.Bool("pruned", false),
        };
    }

    static double Positive(ConfigFile f, string field, double fallback)
    {
        double x = f.Double(field, fallback);
        if (!(x > 0) || !double.IsFinite(x)) throw f.Unsupported(field, $"is {x}; must be a positive number");
        return x;
    }

    /// <summary>
    /// `layer_types` where given; otherwise HF's default rule: layer i slides unless (i + 1) is a multiple of the pattern
    /// (Gemma 2: 2, so layers 0, 2, … slide; Gemma 3: `sliding_window_pattern`, default 6).
    /// </summary>
    static bool[] SlidingLayers(ConfigFile f, int layers, bool g3)
    {
        if (f.Json["layer_types"] is JsonNode) return f.SlidingLayerTypes(layers);
        int pattern = g3 ? f.Int("sliding_window_pattern", 6) : 2;
        return Enumerable.Range(0, layers).Select(i => (i + 1) % pattern != 0).ToArray();
    }

    /// <summary>
    /// Why the stock class cannot hold a bias added to node layer <paramref name="nodeLayer"/>'s consumer, or null where
    /// it can: o_proj through `attention_bias` (with q, k and v biases); the Gemma MLP has none.
    /// </summary>
    public string? NoConsumerBias(int nodeLayer) => nodeLayer == 0 ? null : $"stock {ModelType} down_proj has no bias";
}
