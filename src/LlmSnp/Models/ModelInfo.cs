using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>`llmsnp inspect`: family, dtype, parameter count and per-layer widths of a checkpoint.</summary>
public static class ModelInfo
{
    public static JsonObject Inspect(string modelDir)
    {
        using var m = ModelFamilies.Open(modelDir);
        return m.Describe();
    }
}
