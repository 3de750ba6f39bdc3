using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>`llmsnp inspect`: family, dtype, parameter count and per-layer widths of a checkpoint.</summary>
public static class ModelInfo
{
    public static JsonObject Inspect(string modelDir)
    {
        using var m = ModelFamilies.Open(modelDir);   // validates every tensor's presence and shape against the config
        var d = m.Describe();
        d["unused_tensors"] = new JsonArray(m.UnusedTensors.Select(n => (JsonNode)n).ToArray());
        return d;
    }
}
