using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>
/// The fields of a Phi-3 / Phi-3.5 / Phi-4-mini config.json the forward depends on (docs/models.md, "Phi-3
/// family"), read as HF `Phi3Config` reads them. Per-layer widths of a pruned checkpoint come from its lists; a
/// uniform prune stores them in the stock fields, which is what the stock class reads.
/// </summary>
public sealed class Phi3Config : IDecoderConfig
{
    public static readonly string[] ModelTypes = { "phi3" };

    /// <summary>Phi3Config's own defaults (configuration_phi3.py).</summary>
    const int DefaultMaxPositions = 4096, DefaultOriginalMaxPositions = 4096;

    /// <summary>Phi3Config maps these older rope_scaling type names to longrope.</summary>
    static readonly string[] LongRopeAliases = { "su", "yarn" };

    public required ConfigFile File { get; init; }
    public int VocabSize { get; init; }
    public int Hidden { get; init; }
    public int Layers { get; init; }
    public int Heads { get; init; }
    public int KvHeads { get; init; }
    public int HeadDim { get; init; }
    /// <summary>Dims of each head that RoPE rotates: int(head_dim · partial_rotary_factor); the rest pass through.</summary>
    public int RotaryDim { get; init; }
    public double PartialRotaryFactor { get; init; }
    public int Intermediate { get; init; }
    public double RmsNormEps { get; init; }
    public double RopeTheta { get; init; }
    /// <summary>none, or longrope (short/long factors, attention factor).</summary>
    public required RopeScaling Rope { get; init; }
    public int MaxPositions { get; init; }
    public int OriginalMaxPositions { get; init; }
    public bool TieWordEmbeddings { get; private set; }
    /// <summary>A tied config whose checkpoint stores a different head is untied, as transformers loads it.</summary>
    public void Untie()
    {
        TieWordEmbeddings = false;
        File.Json["tie_word_embeddings"] = false;
    }
    /// <summary>Keys fewer than this many positions back are attended (null: full causal attention).</summary>
    public int? SlidingWindow { get; init; }
    public required DecoderWidths Widths { get; init; }
    public bool Pruned { get; init; }
    public int? BosId { get; init; }
    public int? EosId { get; init; }

    public static Phi3Config From(ConfigFile f)
    {
        string type = f.ModelType;
        if (!ModelTypes.Contains(type)) throw new LlmSnpException($"{f.Path}: model_type '{type}' is not phi3");
        int hidden = f.Int("hidden_size"), heads = f.Int("num_attention_heads"), layers = f.Layers();
        if (f.Has("rope_parameters")) throw f.Unsupported("rope_parameters", "is the transformers 5 layout; LlmSnp reads rope_theta and rope_scaling");
        int kv = f.Int("num_key_value_heads", heads);
        int headDim;
        // HF Phi3Attention: getattr(config, "head_dim", hidden_size // num_attention_heads); a pruned config states it.
        if (f.Has("head_dim")) headDim = f.Int("head_dim");
        else if (hidden % heads != 0) throw f.Unsupported("num_attention_heads", $"({heads}) does not divide hidden_size ({hidden}) and no head_dim is given");
        else headDim = hidden / heads;
        double partial = f.Double("partial_rotary_factor", 1.0);
        if (!(partial > 0 && partial <= 1)) throw f.Unsupported("partial_rotary_factor", $"is {partial}; must be in (0, 1]");
        int rotary = (int)(headDim * partial);
        if (rotary < 2 || rotary % 2 != 0)
            throw f.Unsupported("partial_rotary_factor", $"({partial}) × head_dim {headDim} gives a rotary dimension of {rotary}; rotate-half RoPE needs an even one of at least 2");
        string act = f.Has("hidden_act") ? f.String("hidden_act") : "silu";
        if (act != "silu") throw f.Unsupported("hidden_act", $"is '{act}'; only silu is supported");
        int inter = f.Int("intermediate_size");
        int maxPos = f.Int("max_position_embeddings", DefaultMaxPositions);
        int origPos = f.Int("original_max_position_embeddings", DefaultOriginalMaxPositions);
        double eps = f.Double("rms_norm_eps", 1e-5), theta = f.Double("rope_theta", 10000.0);
        if (!(eps > 0) || !double.IsFinite(eps)) throw f.Unsupported("rms_norm_eps", $"is {eps}; must be a positive number");
        if (!(theta > 0) || !double.IsFinite(theta)) throw f.Unsupported("rope_theta", $"is {theta}; must be a positive number");
        // Phi3Config always has original_max_position_embeddings (default 4096): longrope's factor is then the ratio of the
        // contexts, whatever rope_scaling.factor says (HF 4.48 `_compute_longrope_parameters`).
        var rope = RopeScaling.From(f, maxPos, origPos, LongRopeAliases);
        // Phi3Config accepts longrope only (su and yarn being its old names).
        if (rope.Type is not ("default" or "longrope")) throw f.Unsupported("rope_scaling", $"type '{rope.Type}' is not supported for phi3 (longrope, or its old names su and yarn)");
        rope.Check(f, rotary);
        int? window = null;
        if (f.Json["sliding_window"] is JsonNode) window = f.Int("sliding_window");   // HF masks j > i − W whenever it is set
        var widths = DecoderWidths.From(f, layers, heads, kv, inter);
        return new Phi3Config
        {
            File = f,
            VocabSize = f.Int("vocab_size"), Hidden = hidden, Layers = layers, Heads = heads, KvHeads = kv, HeadDim = headDim,
            RotaryDim = rotary, PartialRotaryFactor = partial, Intermediate = inter, RmsNormEps = eps, RopeTheta = theta, Rope = rope,
            MaxPositions = maxPos, OriginalMaxPositions = origPos,
            TieWordEmbeddings = f.Bool("tie_word_embeddings", false),
            SlidingWindow = window,
            Widths = widths,
            Pruned = f.Bool("pruned", false),
            BosId = f.Json["bos_token_id"] is JsonValue ? f.Int("bos_token_id", min: 0) : null,
            EosId = f.Json["eos_token_id"] is JsonValue ? f.Int("eos_token_id", min: 0) : null,
        };
    }

    /// <summary>Query heads per K/V head (the size of an attention unit, in heads).</summary>
    public int QueriesPerKv => Heads / KvHeads;

    /// <summary>
    /// The rows of layer <paramref name="i"/>'s fused projections and the config fields that give them, for errors that
    /// name both: qkv_proj = q rows, then k, then v; gate_up_proj = gate rows, then up.
    /// </summary>
    public (long[] Qkv, string QkvWhy, long[] GateUp, string GateUpWhy) Fused(int i)
    {
        var w = Widths;
        bool perLayer = File.Has("num_heads_per_layer") || File.Has("num_key_value_heads_per_layer");
        string h = perLayer ? $"num_heads_per_layer[{i}] {w.Heads[i]}" : $"num_attention_heads {w.Heads[i]}";
        string k = perLayer ? $"num_key_value_heads_per_layer[{i}] {w.KvHeads[i]}" : $"num_key_value_heads {w.KvHeads[i]}";
        string f = File.Has("intermediate_sizes") ? $"intermediate_sizes[{i}] {w.Intermediate[i]}" : $"intermediate_size {w.Intermediate[i]}";
        long q = (long)w.Heads[i] * HeadDim, kv = (long)w.KvHeads[i] * HeadDim, ff = w.Intermediate[i];
        return (new[] { q, kv, kv }, $"({h} + 2 × {k}) × head_dim {HeadDim} = {q + 2 * kv} (q, then k, then v)",
            new[] { ff, ff }, $"2 × {f} = {2 * ff} (gate, then up)");
    }
}
