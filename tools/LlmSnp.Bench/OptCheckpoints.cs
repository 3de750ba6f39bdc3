using TorchSharp;
using LlmSnp.Checkpoint;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Benchmarks;

/// <summary>
/// OPT checkpoints for benchmarks and fuzzing: the HF tensor layout of an <see cref="OptShape"/>
/// (one list, so the generators do not each restate the names) and a random-weight writer.
/// </summary>
public static class OptCheckpoints
{
    public const string Prefix = "model.decoder.";

    /// <summary>
    /// Every tensor of the shape in HF layout: name, shape, and the init (std, mean) the random
    /// writer uses. <paramref name="ffnDims"/> overrides per-layer MLP widths (pruned checkpoints).
    /// </summary>
    public static IEnumerable<(string Name, long[] Shape, double Std, double Mean)> Layout(OptShape s, IReadOnlyList<int>? ffnDims = null)
    {
        int p = s.ProjDim ?? s.Hidden;
        yield return (Prefix + "embed_tokens.weight", new long[] { s.Vocab, p }, 0.02, 0);
        yield return (Prefix + "embed_positions.weight", new long[] { s.MaxPositions + 2, s.Hidden }, 0.02, 0);
        if (p != s.Hidden)
        {
            yield return (Prefix + "project_in.weight", new long[] { s.Hidden, p }, 0.02, 0);
            yield return (Prefix + "project_out.weight", new long[] { p, s.Hidden }, 0.02, 0);
        }
        for (int i = 0; i < s.Layers; i++)
        {
            string l = $"{Prefix}layers.{i}.";
            long f = ffnDims?[i] ?? s.Ffn;
            foreach (var n in new[] { "q_proj", "k_proj", "v_proj", "out_proj" })
            {
                yield return (l + $"self_attn.{n}.weight", new long[] { s.Hidden, s.Hidden }, 0.02, 0);
                yield return (l + $"self_attn.{n}.bias", new long[] { s.Hidden }, 0.02, 0);
            }
            yield return (l + "self_attn_layer_norm.weight", new long[] { s.Hidden }, 0.02, 1);
            yield return (l + "self_attn_layer_norm.bias", new long[] { s.Hidden }, 0.02, 0);
            yield return (l + "fc1.weight", new long[] { f, s.Hidden }, 0.02, 0);
            yield return (l + "fc1.bias", new long[] { f }, 0.02, 0);
            yield return (l + "fc2.weight", new long[] { s.Hidden, f }, 0.02, 0);
            yield return (l + "fc2.bias", new long[] { s.Hidden }, 0.02, 0);
            yield return (l + "final_layer_norm.weight", new long[] { s.Hidden }, 0.02, 1);
            yield return (l + "final_layer_norm.bias", new long[] { s.Hidden }, 0.02, 0);
        }
        if (s.PreLayerNorm)
        {
            yield return (Prefix + "final_layer_norm.weight", new long[] { s.Hidden }, 0.02, 1);
            yield return (Prefix + "final_layer_norm.bias", new long[] { s.Hidden }, 0.02, 0);
        }
    }

    /// <summary>
    /// Writes a random-weight checkpoint of this shape in HF layout, one tensor at a time so that a
    /// 13 GB model needs no more memory than its largest tensor.
    /// </summary>
    public static void WriteRandom(this OptShape s, string dir, ScalarType dtype, int seed, long shardBytes = 5L << 30)
    {
        var gen = new torch.Generator((ulong)seed);
        using (var w = new SafeTensorsWriter(dir, shardBytes))
        {
            foreach (var (name, shape, std, mean) in Layout(s))
            {
                using var scope = NewDisposeScope();
                w.Add(name, (torch.randn(shape, ScalarType.Float32, generator: gen) * std + mean).to(dtype));
            }
            w.Finish();
        }
        AtomicFile.WriteAllText(Path.Combine(dir, "config.json"), s.Config(dtype).ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
    }
}
