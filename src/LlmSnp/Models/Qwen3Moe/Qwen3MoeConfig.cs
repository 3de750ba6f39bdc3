using System.Text.Json;
using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>
/// Qwen3-MoE's config.json (HF `Qwen3MoeConfig`, docs/models.md "Qwen3-MoE"): Qwen3 attention (per-head q/k RMSNorms,
/// head_dim default hidden / heads, optional q/k/v/o biases), `num_experts` experts of `moe_intermediate_size` in the
/// sparse layers — layer i unless i is in `mlp_only_layers` or (i+1) is not a multiple of `decoder_sparse_step` — and a
/// dense SwiGLU of `intermediate_size` in the others; `num_experts_per_tok` chosen per token, renormalised only where
/// `norm_topk_prob` (default false). Checkpoint names as on the hub: `mlp.gate`, `mlp.experts.{e}.gate_proj/up_proj/down_proj`.
/// </summary>
public static class Qwen3MoeConfig
{
    public static readonly string[] ModelTypes = { "qwen3_moe" };

    public static readonly MoeNames Names = new("mlp.gate", "mlp.experts", "gate_proj", "up_proj", "down_proj", "mlp");

    public static MoeConfig Load(string modelDir) => From(ConfigFile.Load(modelDir));

    public static MoeConfig From(ConfigFile f)
    {
        if (!ModelTypes.Contains(f.ModelType)) throw new LlmSnpException($"{f.Path}: model_type '{f.ModelType}' is not qwen3_moe");
        var a = MoeConfig.ReadAttention(f, epsDefault: 1e-6, thetaDefault: 10000.0, maxPositionsDefault: 32768);
        var (experts, topK) = MoeConfig.ReadRouter(f, "num_experts", 128, 8, allowNone: true);
        if (f.Bool("use_sliding_window", false)) throw f.Unsupported("use_sliding_window", "is true; Qwen3-MoE's per-layer sliding window is not supported");
        int step = f.Int("decoder_sparse_step", 1);
        var mlpOnly = IntSet(f, "mlp_only_layers", a.Layers);
        var sparse = Enumerable.Range(0, a.Layers).Select(i => !mlpOnly.Contains(i) && experts > 0 && (i + 1) % step == 0).ToArray();
        int width = f.Int("moe_intermediate_size", 768), dense = f.Int("intermediate_size", 6144);
        return new MoeConfig
        {
            File = f, ModelType = f.ModelType, Names = Names,
            ExpertsField = "num_experts", ExpertWidthField = "moe_intermediate_size", DenseWidthField = "intermediate_size",
            VocabSize = a.VocabSize, Hidden = a.Hidden, Layers = a.Layers, Heads = a.Heads, KvHeads = a.KvHeads, HeadDim = a.HeadDim,
            RmsNormEps = a.Eps, RopeTheta = a.Theta, Rope = a.Rope, MaxPositions = a.MaxPositions, TieWordEmbeddings = a.Tied,
            SlidingWindow = null, AttentionBias = f.Bool("attention_bias", false), QkNorm = true,
            Experts = experts, TopK = topK, NormTopK = f.Bool("norm_topk_prob", false), Sparse = sparse,
            HeadsPerLayer = a.HeadsPerLayer, KvHeadsPerLayer = a.KvHeadsPerLayer,
            ExpertWidths = MoeConfig.ReadExpertWidths(f, sparse, experts, width),
            DenseWidths = f.IntList("intermediate_sizes", a.Layers) ?? Enumerable.Repeat(dense, a.Layers).ToArray(),
            ExpertWidth = width, DenseWidth = dense,
            Pruned = f.Bool("pruned", false), BosId = a.BosId, EosId = a.EosId,
        };
    }

    /// <summary>A list of layer indices, each in [0, layers).</summary>
    static HashSet<int> IntSet(ConfigFile f, string field, int layers)
    {
        var n = f.Json[field];
        if (n == null) return new HashSet<int>();
        if (n is not JsonArray arr) throw f.Missing(field, "a list of layer indices");
        var r = new HashSet<int>();
        foreach (var x in arr)
        {
            if (x is not JsonValue v || !v.TryGetValue<JsonElement>(out var e) || e.ValueKind != JsonValueKind.Number || !e.TryGetInt32(out int i))
                throw f.Missing(field, "a list of layer indices");
            if (i < 0 || i >= layers) throw f.Unsupported(field, $"holds {i}, outside the {layers} layers");
            r.Add(i);
        }
        return r;
    }
}
