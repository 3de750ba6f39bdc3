using System.Text.RegularExpressions;
using LlmSnp.Checkpoint;

namespace LlmSnp.Models;

/// <summary>
/// Checks a checkpoint's tensors against what its config says the model holds, from the headers
/// alone, when the model is opened: a missing tensor or a wrong shape is an error (`inspect` too, not
/// only `eval`); layers past `num_hidden_layers` are an error (silently using part of a model would
/// change every result); other tensors the model does not use are returned for a one-line warning.
/// </summary>
public static partial class CheckpointLayout
{
    [GeneratedRegex(@"(?:^|\.)(?:layers|layer|blocks)\.(\d+)\.")]
    private static partial Regex LayerIndex();

    /// <param name="expected">Every tensor the model reads, with its shape from the config.</param>
    /// <param name="tolerated">Tensors that may be present and are not used (a tied head stored anyway).</param>
    /// <returns>The names of stored tensors the model does not use.</returns>
    public static IReadOnlyList<string> Check(CheckpointReader ck, string modelDir, int layers,
        IEnumerable<(string Name, long[] Shape)> expected, IEnumerable<string>? tolerated = null)
    {
        var want = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, shape) in expected)
        {
            want.Add(name);
            var e = ck.Entry(name);   // missing: one line naming it
            if (!SafeDTypes.ToTorch(e.DType).IsFloatingPoint())
                throw new LlmSnpException($"{modelDir}: tensor '{name}' is stored as {e.DType}, not as floating-point weights (a quantized checkpoint?); LlmSnp prunes full-precision weights");
            if (!e.Shape.SequenceEqual(shape))
                throw new LlmSnpException($"{modelDir}: tensor '{name}' has shape [{string.Join(", ", e.Shape)}], config says [{string.Join(", ", shape)}]");
        }
        var ok = new HashSet<string>(tolerated ?? Array.Empty<string>(), StringComparer.Ordinal);
        var unused = ck.Names.Where(n => !want.Contains(n) && !ok.Contains(n)).OrderBy(n => n, StringComparer.Ordinal).ToList();
        var beyond = unused.Select(n => LayerIndex().Match(n)).Where(m => m.Success && int.Parse(m.Groups[1].Value) >= layers)
            .Select(m => int.Parse(m.Groups[1].Value)).ToList();
        if (beyond.Count > 0)
            throw new LlmSnpException($"{Path.Combine(modelDir, "config.json")}: field 'num_hidden_layers' is {layers}, but the checkpoint has tensors of layer {beyond.Max()} ({beyond.Max() + 1} layers or more)");
        return unused;
    }

    /// <summary>The warning line for unused tensors (null when there are none).</summary>
    public static string? Warning(string modelDir, IReadOnlyList<string> unused) => unused.Count == 0 ? null
        : $"warning: {modelDir}: {unused.Count} tensor(s) the model does not use are ignored: {string.Join(", ", unused.Take(5))}{(unused.Count > 5 ? ", ..." : "")}";
}
