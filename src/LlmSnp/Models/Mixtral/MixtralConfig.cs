using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>
/// Mixtral's config.json (HF `MixtralConfig`, docs/models.md "Mixtral"): Mistral attention (head_dim default
/// hidden / heads, θ default 1e6, optional sliding window), a sparse mixture in every layer with
/// `num_local_experts` experts of `intermediate_size`, `num_experts_per_tok` chosen per token and always
/// renormalised. Checkpoint names as on the hub: `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w3/w2`.
/// </summary>
public static class MixtralConfig
{
    public static readonly string[] ModelTypes = { "mixtral" };

    public static readonly MoeNames Names = new("block_sparse_moe.gate", "block_sparse_moe.experts", "w1", "w3", "w2", null);

    public static MoeConfig Load(string modelDir) => From(ConfigFile.Load(modelDir));

    public static MoeConfig From(ConfigFile f)
    {
        if (!ModelTypes.Contains(f.ModelType)) throw new LlmSnpException($"{f.Path}: model_type '{f.ModelType}' is not mixtral");
        var a = MoeConfig.ReadAttention(f, epsDefault: 1e-5, thetaDefault: 1e6, maxPositionsDefault: 4096 * 32);
        var (experts, topK) = MoeConfig.ReadRouter(f, "num_local_experts", 8, 2);
        int width = f.Int("intermediate_size");
        var sparse = Enumerable.Repeat(true, a.Layers).ToArray();
        int? window = f.Json["sliding_window"] is JsonNode ? f.Int("sliding_window") : null;
        return new MoeConfig
        {
            File = f, ModelType = f.ModelType, Names = Names,
            ExpertsField = "num_local_experts", ExpertWidthField = "intermediate_size", DenseWidthField = null,
            VocabSize = a.VocabSize, Hidden = a.Hidden, Layers = a.Layers, Heads = a.Heads, KvHeads = a.KvHeads, HeadDim = a.HeadDim,
            RmsNormEps = a.Eps, RopeTheta = a.Theta, Rope = a.Rope, MaxPositions = a.MaxPositions, TieWordEmbeddings = a.Tied,
            SlidingWindow = window, AttentionBias = false, QkNorm = false,
            Experts = experts, TopK = topK, NormTopK = true, Sparse = sparse,
            HeadsPerLayer = a.HeadsPerLayer, KvHeadsPerLayer = a.KvHeadsPerLayer,
            ExpertWidths = MoeConfig.ReadExpertWidths(f, sparse, experts, width),
            DenseWidths = new int[a.Layers], ExpertWidth = width, DenseWidth = 0,
            Pruned = f.Bool("pruned", false), BosId = a.BosId, EosId = a.EosId,
        };
    }
}
