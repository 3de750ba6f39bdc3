using System.Text.Json;
using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>
/// The checkpoint names of a sparse-MoE decoder layer's mixture, relative to <c>model.layers.{i}.</c>: the router
/// <c>{Router}.weight</c> [experts, hidden], expert e's <c>{Experts}.{e}.{Gate|Up|Down}.weight</c>, and the dense MLP
/// <c>{DenseMlp}.{gate,up,down}_proj</c> of layers without experts (null: the family has none).
/// </summary>
public sealed record MoeNames(string Router, string Experts, string Gate, string Up, string Down, string? DenseMlp);

/// <summary>
/// A sparse mixture-of-experts decoder's configuration as the shared MoE forward reads it (Mixtral, Qwen3-MoE): the
/// LLaMA-style attention fields, the router and experts, which layers are sparse, and the per-layer widths of a pruned
/// checkpoint. Each family's parser (<c>MixtralConfig</c>, <c>Qwen3MoeConfig</c>) fills it from its own config.json
/// fields and defaults; nothing else reads config.json.
/// </summary>
public sealed class MoeConfig : IDecoderConfig
{
    public required ConfigFile File { get; init; }
    public required string ModelType { get; init; }
    public required MoeNames Names { get; init; }
    /// <summary>Stock fields a pruned config writes: the expert count, the expert width, the dense MLP width (null: none).</summary>
    public required string ExpertsField { get; init; }
    public required string ExpertWidthField { get; init; }
    public string? DenseWidthField { get; init; }

    public int VocabSize { get; init; }
    public int Hidden { get; init; }
    public int Layers { get; init; }
    public int Heads { get; init; }
    public int KvHeads { get; init; }
    public int HeadDim { get; init; }
    public double RmsNormEps { get; init; }
    public double RopeTheta { get; init; }
    public required RopeScaling Rope { get; init; }
    public int MaxPositions { get; init; }
    public bool TieWordEmbeddings { get; internal set; }
    /// <summary>A tied config whose checkpoint stores a different head is untied, as transformers loads it.</summary>
    public void Untie()
    {
        TieWordEmbeddings = false;
        File.Json["tie_word_embeddings"] = false;
    }
    public int? SlidingWindow { get; init; }
    /// <summary>q/k/v/o biases (Qwen3-MoE's attention_bias).</summary>
    public bool AttentionBias { get; init; }
    /// <summary>Per-head RMSNorms of q and k before RoPE (Qwen3-MoE).</summary>
    public bool QkNorm { get; init; }

    /// <summary>Experts of a sparse layer (the stock field).</summary>
    public int Experts { get; init; }
    public int TopK { get; init; }
    /// <summary>The chosen experts' weights are divided by their sum (Mixtral always; Qwen3-MoE where norm_topk_prob).</summary>
    public bool NormTopK { get; init; }
    /// <summary>Whether layer i has experts (else a dense SwiGLU MLP).</summary>
    public required bool[] Sparse { get; init; }

    public required int[] HeadsPerLayer { get; init; }
    public required int[] KvHeadsPerLayer { get; init; }
    /// <summary>Per layer, each expert's intermediate width (empty for a dense layer).</summary>
    public required int[][] ExpertWidths { get; init; }
    /// <summary>Per layer, the dense MLP's width (unused at sparse layers).</summary>
    public required int[] DenseWidths { get; init; }
    public int ExpertWidth { get; init; }
    public int DenseWidth { get; init; }
    public bool Pruned { get; init; }
    public int? BosId { get; init; }
    public int? EosId { get; init; }

    public int QueriesPerKv => Heads / KvHeads;

    /// <summary>The attention fields the two families share: head layout, norms, RoPE, positions, vocabulary.</summary>
    public sealed record Attention(int VocabSize, int Hidden, int Layers, int Heads, int KvHeads, int HeadDim, double Eps, double Theta, RopeScaling Rope,
        int MaxPositions, bool Tied, int[] HeadsPerLayer, int[] KvHeadsPerLayer, int? BosId, int? EosId);

    public static Attention ReadAttention(ConfigFile f, double epsDefault, double thetaDefault, int maxPositionsDefault)
    {
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
        int maxPos = f.Int("max_position_embeddings", maxPositionsDefault);
        var headsPerLayer = f.IntList("num_heads_per_layer", layers) ?? Enumerable.Repeat(heads, layers).ToArray();
        var kvPerLayer = f.IntList("num_key_value_heads_per_layer", layers) ?? Enumerable.Repeat(kv, layers).ToArray();
        for (int i = 0; i < layers; i++)
            if (headsPerLayer[i] % kvPerLayer[i] != 0 || headsPerLayer[i] / kvPerLayer[i] != heads / kv)
                throw f.Unsupported("num_heads_per_layer", $"[{i}] = {headsPerLayer[i]} with {kvPerLayer[i]} K/V heads: every layer must keep {heads / kv} query heads per K/V head");
        double eps = f.Double("rms_norm_eps", epsDefault), theta = f.Double("rope_theta", thetaDefault);
        if (!(eps > 0) || !double.IsFinite(eps)) throw f.Unsupported("rms_norm_eps", $"is {eps}; must be a positive number");
        if (!(theta > 0) || !double.IsFinite(theta)) throw f.Unsupported("rope_theta", $"is {theta}; must be a positive number");
        return new Attention(f.Int("vocab_size"), hidden, layers, heads, kv, headDim, eps, theta, RopeScaling.From(f, maxPos), maxPos,
            f.Bool("tie_word_embeddings", false), headsPerLayer, kvPerLayer,
            f.Json["bos_token_id"] is JsonValue ? f.Int("bos_token_id", min: 0) : null,
            f.Json["eos_token_id"] is JsonValue ? f.Int("eos_token_id", min: 0) : null);
    }

    /// <summary>More experts per layer than any released mixture (they have a few hundred): refused before per-expert arrays are allocated.</summary>
    public const int MaxExperts = 4096;

    /// <summary>The router's fields: experts (at least one), top-k between 1 and the experts.</summary>
    public static (int Experts, int TopK) ReadRouter(ConfigFile f, string expertsField, int expertsDefault, int topKDefault, bool allowNone = false)
    {
        int experts = f.Int(expertsField, expertsDefault, min: allowNone ? 0 : 1);
        if (experts > MaxExperts) throw f.Unsupported(expertsField, $"is {experts}; more than {MaxExperts} experts per layer is not supported");
        if ((long)experts * f.Layers() > 1 << 22) throw f.Unsupported(expertsField, $"is {experts} in each of {f.Layers()} layers; more than {1 << 22} experts in all is not supported");
        int topK = f.Int("num_experts_per_tok", topKDefault);
        if (experts > 0 && topK > experts) throw f.Unsupported("num_experts_per_tok", $"is {topK}, more than the {experts} experts ({expertsField})");
        return (experts, topK);
    }

    /// <summary>
    /// A pruned checkpoint's per-expert widths: `expert_intermediate_sizes`, one list per layer (the layer's experts'
    /// widths; empty at a dense layer). Absent: every expert of a sparse layer has the stock width.
    /// </summary>
    public static int[][] ReadExpertWidths(ConfigFile f, bool[] sparse, int experts, int stockWidth)
    {
        const string field = "expert_intermediate_sizes";
        int layers = sparse.Length;
        var n = f.Json[field];
        if (n == null) return sparse.Select(s => s ? Enumerable.Repeat(stockWidth, experts).ToArray() : Array.Empty<int>()).ToArray();
        if (n is not JsonArray a || a.Count != layers) throw new LlmSnpException($"{f.Path}: field '{field}' must be a list of {layers} lists (one per layer)");
        var r = new int[layers][];
        for (int i = 0; i < layers; i++)
        {
            int want = sparse[i] ? experts : 0;
            if (a[i] is not JsonArray row || row.Count != want)
                throw new LlmSnpException($"{f.Path}: field '{field}'[{i}] must list {want} widths (layer {i} has {want} experts)");
            r[i] = new int[want];
            for (int e = 0; e < want; e++)
                r[i][e] = row[e] is JsonValue v && v.TryGetValue<JsonElement>(out var el) && el.ValueKind == JsonValueKind.Number && el.TryGetInt32(out int x) && x >= 1 ? x
                    : throw new LlmSnpException($"{f.Path}: field '{field}'[{i}][{e}] is not a positive integer");
        }
        return r;
    }
}
