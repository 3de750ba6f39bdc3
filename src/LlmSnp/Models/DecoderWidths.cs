using System.Text.Json.Nodes;

namespace LlmSnp.Models;

/// <summary>
/// The per-layer widths of a decoder with grouped K/V heads and a gated MLP (LLaMA family, Qwen3, Gemma): query heads, K/V heads
/// and MLP neurons of every layer. A stock config gives one value each; a checkpoint LlmSnp pruned layer by layer adds
/// the lists `num_heads_per_layer`, `num_key_value_heads_per_layer` and `intermediate_sizes`, read here and nowhere else.
/// </summary>
public sealed record DecoderWidths(int[] Heads, int[] KvHeads, int[] Intermediate)
{
    public static DecoderWidths From(ConfigFile f, int layers, int heads, int kvHeads, int intermediate)
    {
        if (heads % kvHeads != 0) throw f.Unsupported("num_key_value_heads", $"({kvHeads}) does not divide num_attention_heads ({heads})");
        var h = f.IntList("num_heads_per_layer", layers) ?? Enumerable.Repeat(heads, layers).ToArray();
        var kv = f.IntList("num_key_value_heads_per_layer", layers) ?? Enumerable.Repeat(kvHeads, layers).ToArray();
        for (int i = 0; i < layers; i++)
            if (h[i] % kv[i] != 0 || h[i] / kv[i] != heads / kvHeads)
                throw f.Unsupported("num_heads_per_layer", $"[{i}] = {h[i]} with {kv[i]} K/V heads: every layer must keep {heads / kvHeads} query heads per K/V head");
        var inter = f.IntList("intermediate_sizes", layers) ?? Enumerable.Repeat(intermediate, layers).ToArray();
        // A list of one value is a uniform prune, which states that value in the stock field too (what a stock class reads).
        foreach (var (list, stockField, stock, values) in new[] { ("intermediate_sizes", "intermediate_size", intermediate, inter),
            ("num_heads_per_layer", "num_attention_heads", heads, h), ("num_key_value_heads_per_layer", "num_key_value_heads", kvHeads, kv) })
            if (f.Has(list) && values.All(x => x == values[0]) && values[0] != stock)
                throw f.Unsupported(stockField, $"is {stock} but every entry of '{list}' is {values[0]} (a uniformly pruned checkpoint states the pruned value in both)");
        return new DecoderWidths(h, kv, inter);
    }

    public bool Uniform => Heads.Distinct().Count() == 1 && KvHeads.Distinct().Count() == 1 && Intermediate.Distinct().Count() == 1;

    /// <summary>
    /// config.json of a pruned checkpoint (node layer 0 = K/V groups, 1 = MLP neurons): `pruned`, an explicit `head_dim`
    /// and the per-layer lists; where every layer keeps the same widths the stock fields hold them too, so that the
    /// family's stock class builds exactly the stored shapes.
    /// </summary>
    public static void WritePruned(JsonObject cfg, IReadOnlyList<KeptBlock> kept, int queriesPerKv, int headDim)
    {
        var kv = kept.Select(k => k.Groups[0].Length).ToArray();
        var heads = kv.Select(g => g * queriesPerKv).ToArray();
        var mlp = kept.Select(k => k.Groups[1].Length).ToArray();
        cfg["pruned"] = true;
        cfg["head_dim"] = headDim;
        cfg["intermediate_sizes"] = Ints(mlp);
        cfg["num_heads_per_layer"] = Ints(heads);
        cfg["num_key_value_heads_per_layer"] = Ints(kv);
        if (mlp.Distinct().Count() == 1) cfg["intermediate_size"] = mlp[0];
        if (kv.Distinct().Count() == 1)
        {
            cfg["num_attention_heads"] = heads[0];
            cfg["num_key_value_heads"] = kv[0];
        }
    }

    /// <summary>The fields <see cref="WritePruned"/> adds that a zero-padded copy (original shapes) must not carry.</summary>
    public static void RemovePruned(JsonObject cfg)
    {
        foreach (var k in new[] { "pruned", "intermediate_sizes", "num_heads_per_layer", "num_key_value_heads_per_layer" }) cfg.Remove(k);
    }

    /// <summary>Why a stock class with one width per model cannot hold these kept widths, or null.</summary>
    public static string? NotUniform(IReadOnlyList<KeptBlock> kept, string modelType, string? gguf = null)
    {
        if (kept.Select(k => k.Groups[1].Length).Distinct().Count() > 1) return $"MLP widths differ across layers (stock {modelType} has one intermediate_size){gguf}";
        if (kept.Select(k => k.Groups[0].Length).Distinct().Count() > 1) return $"K/V groups differ across layers (stock {modelType} has one num_key_value_heads){gguf}";
        return null;
    }

    /// <summary>
    /// A reconstruction that gave a node layer's consumers a bias turns on the config flag that makes the stock class
    /// hold it (every layer alike, or none: the flag is one for the model).
    /// </summary>
    public static void SetBiasFlag(JsonObject cfg, IReadOnlyList<KeptBlock> kept, int nodeLayer, string flag)
    {
        var has = kept.Select(k => k.ConsumerBias[nodeLayer]).Distinct().ToArray();
        if (has.Length != 1) throw new InvalidOperationException($"{flag}: some layers have a consumer bias and others not");
        if (has[0]) cfg[flag] = true;
    }

    static JsonArray Ints(IEnumerable<int> xs) => new(xs.Select(x => (JsonNode)x).ToArray());
}
