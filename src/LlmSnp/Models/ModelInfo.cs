using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>`llmsnp inspect`: family, dtype, parameter count and per-layer widths of a checkpoint.</summary>
public static class ModelInfo
{
    public static JsonObject Inspect(string modelDir)
    {
        var cfg = ConfigFile.Load(modelDir);
        switch (cfg.ModelType)
        {
            case "opt":
                using (var m = new OptModel(modelDir))
                {
                    var c = m.Config;
                    return new JsonObject
                    {
                        ["family"] = "opt",
                        ["dtype"] = Checkpoint.SafeDTypes.ConfigName(m.StoredDType),
                        ["parameters"] = m.ParameterCount(),
                        ["pruned"] = c.Pruned,
                        ["layers"] = c.Layers, ["hidden_size"] = c.Hidden, ["head_dim"] = c.HeadDim,
                        ["vocab_size"] = c.VocabSize, ["max_position_embeddings"] = c.MaxPositions,
                        ["layer_norm"] = c.PreLayerNorm ? "pre" : "post",
                        ["word_embed_proj_dim"] = c.WordEmbedProjDim, ["tie_word_embeddings"] = c.TieWordEmbeddings,
                        ["tensor_prefix"] = m.Prefix,
                        ["per_layer"] = new JsonArray(Enumerable.Range(0, c.Layers).Select(i => (JsonNode)new JsonObject
                        {
                            ["heads"] = c.HeadsPerLayer[i], ["ffn_dim"] = c.FfnDims[i],
                            ["parameters"] = m.BlockParameters(c.HeadsPerLayer[i], c.FfnDims[i]),
                        }).ToArray()),
                    };
                }
            case "vit":
            case "deit":
                using (var m = new VitModel(modelDir))
                {
                    var c = m.Config;
                    return new JsonObject
                    {
                        ["family"] = c.ModelType,
                        ["layout"] = m.Timm ? "timm" : "hf",
                        ["distilled"] = m.Distilled,
                        ["dtype"] = Checkpoint.SafeDTypes.ConfigName(m.StoredDType),
                        ["parameters"] = m.ParameterCount(),
                        ["pruned"] = c.Pruned,
                        ["layers"] = c.Layers, ["hidden_size"] = c.Hidden, ["head_dim"] = c.HeadDim,
                        ["image_size"] = c.ImageSize, ["patch_size"] = c.PatchSize, ["layer_norm_eps"] = c.LayerNormEps,
                        ["per_layer"] = new JsonArray(Enumerable.Range(0, c.Layers).Select(i => (JsonNode)new JsonObject
                        {
                            ["heads"] = c.HeadsPerLayer[i], ["intermediate_size"] = c.IntermediateSizes[i],
                            ["parameters"] = m.BlockParameters(c.HeadsPerLayer[i], c.IntermediateSizes[i]),
                        }).ToArray()),
                    };
                }
            default:
                throw new LlmSnpException($"{cfg.Path}: model_type '{cfg.ModelType}' is not supported (supported: opt, vit, deit)");
        }
    }
}
