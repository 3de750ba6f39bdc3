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
}
