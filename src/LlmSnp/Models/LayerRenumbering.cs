using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>
/// A checkpoint written without some of its blocks (depth pruning): the kept blocks' tensors and the per-layer config
/// fields renumbered to 0..kept−1, for every family alike. The one place that knows which config fields are per layer.
/// </summary>
public static class LayerRenumbering
{
    /// <summary>Config lists with one entry per layer (transformers' own and the per-layer widths LlmSnp writes).</summary>
    public static readonly IReadOnlyList<string> PerLayerLists = new[]
    {
        "layer_types", "intermediate_sizes", "num_heads_per_layer", "num_key_value_heads_per_layer", "ffn_dims",
    };

    /// <summary>
    /// A block's tensors under the names of layer <paramref name="to"/>: the first all-digit segment of each name
    /// (model.layers.7.mlp… → model.layers.2.mlp…) is the layer index and must be <paramref name="from"/>.
    /// </summary>
    public static IEnumerable<(string Name, Tensor Tensor)> Rename(IEnumerable<(string Name, Tensor Tensor)> tensors, int from, int to)
    {
        foreach (var (name, t) in tensors) yield return (RenameOne(name, from, to), t);
    }

    public static string RenameOne(string name, int from, int to)
    {
        if (from == to) return name;
        var parts = name.Split('.');
        int i = Array.FindIndex(parts, p => p.Length > 0 && p.All(char.IsAsciiDigit));
        if (i < 0 || parts[i] != from.ToString(System.Globalization.CultureInfo.InvariantCulture))
            throw new InvalidOperationException($"{name}: expected the layer index {from} as its first numeric segment");
        parts[i] = to.ToString(System.Globalization.CultureInfo.InvariantCulture);
        return string.Join('.', parts);
    }

    /// <summary>
    /// The pruned config of a model that keeps original blocks <paramref name="kept"/> (ascending) of
    /// <paramref name="originalLayers"/>: `num_hidden_layers` reduced; per-layer lists still of the original length
    /// filtered to the kept layers (lists a family wrote for the kept blocks already have their length); layer kinds a
    /// family derives from a pattern (<paramref name="layerTypes"/>) written out as `layer_types`, since dropping a
    /// block shifts the pattern; `mlp_only_layers` and `decoder_sparse_step` (mixtures) turned into kept indices.
    /// </summary>
    public static void Config(JsonObject cfg, IReadOnlyList<int> kept, int originalLayers, IReadOnlyList<string>? layerTypes)
    {
        cfg["num_hidden_layers"] = kept.Count;
        foreach (var field in PerLayerLists)
            if (cfg[field] is JsonArray a && a.Count == originalLayers)
                cfg[field] = new JsonArray(kept.Select(i => a[i]?.DeepClone()).ToArray());
        if (layerTypes is not null && cfg["layer_types"] is null)
            cfg["layer_types"] = new JsonArray(kept.Select(i => (JsonNode)layerTypes[i]).ToArray());
        // Mixtures: layer i is dense if listed in mlp_only_layers or (i + 1) is not a multiple of decoder_sparse_step.
        if (cfg["mlp_only_layers"] is JsonArray || cfg["decoder_sparse_step"] is JsonValue)
        {
            int step = cfg["decoder_sparse_step"] is JsonValue v && v.TryGetValue<int>(out var s) && s > 0 ? s : 1;
            var dense = (cfg["mlp_only_layers"] as JsonArray)?.Select(n => n!.GetValue<int>()).ToHashSet() ?? new HashSet<int>();
            var newDense = kept.Select((orig, k) => (orig, k)).Where(x => dense.Contains(x.orig) || (x.orig + 1) % step != 0).Select(x => (JsonNode)x.k).ToArray();
            cfg["mlp_only_layers"] = new JsonArray(newDense);
            if (cfg["decoder_sparse_step"] is not null) cfg["decoder_sparse_step"] = 1;
        }
    }
}
