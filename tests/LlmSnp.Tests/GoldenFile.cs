using System.Text.Json;

namespace LlmSnp.Tests;

/// <summary>The golden.json beside a fixture or bundled model, as tools/reference writes it.</summary>
static class GoldenFile
{
    /// <summary>A golden.json: input ids, float64 reference logits and mean NLL per sequence.</summary>
    internal static (long[][] Ids, double[][][] Logits, double[] Nll) Read(string dir)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "golden.json")));
        var r = doc.RootElement;
        var ids = r.GetProperty("input_ids").EnumerateArray().Select(a => a.EnumerateArray().Select(x => x.GetInt64()).ToArray()).ToArray();
        var logits = r.GetProperty("logits").EnumerateArray().Select(s => s.EnumerateArray().Select(t => t.EnumerateArray().Select(x => x.GetDouble()).ToArray()).ToArray()).ToArray();
        var nll = r.GetProperty("mean_nll").EnumerateArray().Select(x => x.GetDouble()).ToArray();
        return (ids, logits, nll);
    }
}
