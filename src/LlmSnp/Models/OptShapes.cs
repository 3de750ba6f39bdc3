using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>An OPT architecture (models.md §2, released shapes).</summary>
public sealed record OptShape(string Name, int Layers, int Hidden, int Heads, int Ffn, int Vocab = 50272, int MaxPositions = 2048, bool PreLayerNorm = true, int? ProjDim = null)
{
    public static readonly IReadOnlyDictionary<string, OptShape> Released = new Dictionary<string, OptShape>
    {
        ["125m"] = new("125m", 12, 768, 12, 3072),
        ["350m"] = new("350m", 24, 1024, 16, 4096, PreLayerNorm: false, ProjDim: 512),
        ["1.3b"] = new("1.3b", 24, 2048, 32, 8192),
        ["2.7b"] = new("2.7b", 32, 2560, 32, 10240),
        ["6.7b"] = new("6.7b", 32, 4096, 32, 16384),
        ["13b"] = new("13b", 40, 5120, 40, 20480),
    };

    public static OptShape Parse(string s) =>
        Released.TryGetValue(s, out var shape) ? shape : throw new LlmSnpException($"--shape: unknown OPT shape '{s}' ({string.Join(", ", Released.Keys)})");

    public JsonObject Config(ScalarType dtype) => new()
    {
        ["model_type"] = "opt", ["architectures"] = new JsonArray("OPTForCausalLM"), ["vocab_size"] = Vocab, ["hidden_size"] = Hidden,
        ["num_hidden_layers"] = Layers, ["num_attention_heads"] = Heads, ["ffn_dim"] = Ffn, ["max_position_embeddings"] = MaxPositions,
        ["do_layer_norm_before"] = PreLayerNorm, ["word_embed_proj_dim"] = ProjDim ?? Hidden, ["activation_function"] = "relu",
        ["enable_bias"] = true, ["layer_norm_elementwise_affine"] = true, ["tie_word_embeddings"] = true,
        ["torch_dtype"] = SafeDTypes.ConfigName(dtype), ["pad_token_id"] = 1, ["bos_token_id"] = 2, ["eos_token_id"] = 2,
    };

    /// <summary>
    /// Writes a random-weight checkpoint of this shape in HF layout, one tensor at a time so that a
    /// 13 GB model needs no more memory than its largest tensor.
    /// </summary>
    public void WriteRandom(string dir, ScalarType dtype, int seed, long shardBytes = 5L << 30)
    {
        var gen = new torch.Generator((ulong)seed);
        int p = ProjDim ?? Hidden;
        const string pre = "model.decoder.";
        IEnumerable<(string Name, long[] Shape, double Std, double Mean)> Tensors()
        {
            yield return (pre + "embed_tokens.weight", new long[] { Vocab, p }, 0.02, 0);
            yield return (pre + "embed_positions.weight", new long[] { MaxPositions + 2, Hidden }, 0.02, 0);
            if (p != Hidden)
            {
                yield return (pre + "project_in.weight", new long[] { Hidden, p }, 0.02, 0);
                yield return (pre + "project_out.weight", new long[] { p, Hidden }, 0.02, 0);
            }
            for (int i = 0; i < Layers; i++)
            {
                string l = $"{pre}layers.{i}.";
                foreach (var n in new[] { "q_proj", "k_proj", "v_proj", "out_proj" })
                {
                    yield return (l + $"self_attn.{n}.weight", new long[] { Hidden, Hidden }, 0.02, 0);
                    yield return (l + $"self_attn.{n}.bias", new long[] { Hidden }, 0.02, 0);
                }
                yield return (l + "self_attn_layer_norm.weight", new long[] { Hidden }, 0.02, 1);
                yield return (l + "self_attn_layer_norm.bias", new long[] { Hidden }, 0.02, 0);
                yield return (l + "fc1.weight", new long[] { Ffn, Hidden }, 0.02, 0);
                yield return (l + "fc1.bias", new long[] { Ffn }, 0.02, 0);
                yield return (l + "fc2.weight", new long[] { Hidden, Ffn }, 0.02, 0);
                yield return (l + "fc2.bias", new long[] { Hidden }, 0.02, 0);
                yield return (l + "final_layer_norm.weight", new long[] { Hidden }, 0.02, 1);
                yield return (l + "final_layer_norm.bias", new long[] { Hidden }, 0.02, 0);
            }
            if (PreLayerNorm)
            {
                yield return (pre + "final_layer_norm.weight", new long[] { Hidden }, 0.02, 1);
                yield return (pre + "final_layer_norm.bias", new long[] { Hidden }, 0.02, 0);
            }
        }
        using (var w = new SafeTensorsWriter(dir, shardBytes))
        {
            foreach (var (name, shape, std, mean) in Tensors())
            {
                using var scope = NewDisposeScope();
                w.Add(name, (torch.randn(shape, ScalarType.Float32, generator: gen) * std + mean).to(dtype));
            }
            w.Finish();
        }
        AtomicFile.WriteAllText(Path.Combine(dir, "config.json"), Config(dtype).ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
    }
}
