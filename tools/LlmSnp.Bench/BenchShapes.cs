using TorchSharp;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Benchmarks;

/// <summary>A released architecture the benchmark writes with random weights and counts FLOPs for.</summary>
public interface IBenchShape
{
    string Name { get; }
    int Layers { get; }
    int Vocab { get; }
    int MaxPositions { get; }
    IBenchShape WithLayers(int layers);
    /// <summary>Matmul FLOPs of one token through the blocks (causal attention over a window of t: t/2 keys on average).</summary>
    double BlockFlopsPerToken(int t);
    /// <summary>Matmul FLOPs of one token through the final head.</summary>
    double HeadFlopsPerToken { get; }
    /// <summary>Σ over node layers of n² (units squared): the Gram products cost 2·T·n² each.</summary>
    double GramUnitsSquared { get; }
    JsonObject Describe();
    void WriteRandom(string dir, ScalarType dtype, int seed);
    /// <summary>The dtype the random checkpoint is written in (the released models' own).</summary>
    ScalarType DiskDType => ScalarType.Float16;
}

public static class BenchShapes
{
    public static IEnumerable<string> Names => OptShape.Released.Keys.Concat(LlamaShape.Released.Keys).Concat(MoeShape.Released.Keys);

    public static IBenchShape Parse(string s) =>
        OptShape.Released.TryGetValue(s, out var o) ? new OptBenchShape(o)
        : LlamaShape.Released.TryGetValue(s, out var l) ? l
        : MoeShape.Released.TryGetValue(s, out var m) ? m
        : throw new LlmSnpException($"--shape: unknown shape '{s}' ({string.Join(", ", Names)})");

    /// <summary>Writes the tensors one at a time (so a 16 GB model needs no more memory than its largest tensor), then config.json.</summary>
    internal static void Write(string dir, IEnumerable<(string Name, long[] Shape, double Std, double Mean)> layout, JsonObject config, ScalarType dtype, int seed)
    {
        var gen = new torch.Generator((ulong)seed);
        using (var w = new SafeTensorsWriter(dir, 5L << 30))
        {
            foreach (var (name, shape, std, mean) in layout)
            {
                using var scope = NewDisposeScope();
                w.Add(name, (torch.randn(shape, ScalarType.Float32, generator: gen) * std + mean).to(dtype));
            }
            w.Finish();
        }
        AtomicFile.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
    }
}

public sealed record OptBenchShape(OptShape S) : IBenchShape
{
    public string Name => S.Name;
    public int Layers => S.Layers;
    public int Vocab => S.Vocab;
    public int MaxPositions => S.MaxPositions;
    public IBenchShape WithLayers(int layers) => new OptBenchShape(S with { Name = $"{S.Name}-{layers}l", Layers = layers });
    public double BlockFlopsPerToken(int t) => S.Layers * (2.0 * 4 * S.Hidden * S.Hidden + 2.0 * 2 * S.Hidden * S.Ffn + 2.0 * 2 * (t / 2.0) * S.Hidden);
    public double HeadFlopsPerToken => 2.0 * (S.ProjDim ?? S.Hidden) * S.Vocab;
    public double GramUnitsSquared => ((double)S.Hidden * S.Hidden + (double)S.Ffn * S.Ffn) * S.Layers;
    public JsonObject Describe() => new() { ["family"] = "opt", ["name"] = S.Name, ["layers"] = S.Layers, ["hidden"] = S.Hidden, ["heads"] = S.Heads, ["ffn"] = S.Ffn, ["vocab"] = S.Vocab };
    public void WriteRandom(string dir, ScalarType dtype, int seed) => S.WriteRandom(dir, dtype, seed);
}

/// <summary>A LLaMA-family architecture (HF layout, untied head, SwiGLU, grouped K/V heads).</summary>
public sealed record LlamaShape(string Name, int Layers, int Hidden, int Heads, int KvHeads, int Intermediate, int Vocab, int MaxPositions = 4096, double RopeTheta = 10000) : IBenchShape
{
    public static readonly IReadOnlyDictionary<string, LlamaShape> Released = new Dictionary<string, LlamaShape>
    {
        ["llama-7b"] = new("llama-7b", 32, 4096, 32, 32, 11008, 32000),
        ["llama3-8b"] = new("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, 500000),
    };

    int HeadDim => Hidden / Heads;
    public IBenchShape WithLayers(int layers) => this with { Name = $"{Name}-{layers}l", Layers = layers };

    public double BlockFlopsPerToken(int t)
    {
        double q = (double)Heads * HeadDim, kv = (double)KvHeads * HeadDim;
        return Layers * (2.0 * Hidden * (2 * q + 2 * kv) + 2.0 * 3 * Hidden * Intermediate + 2.0 * 2 * (t / 2.0) * q);
    }

    public double HeadFlopsPerToken => 2.0 * Hidden * Vocab;
    public double GramUnitsSquared => ((double)Heads * HeadDim * Heads * HeadDim + (double)Intermediate * Intermediate) * Layers;

    public JsonObject Describe() => new()
    {
        ["family"] = "llama", ["name"] = Name, ["layers"] = Layers, ["hidden"] = Hidden, ["heads"] = Heads, ["kv_heads"] = KvHeads,
        ["intermediate"] = Intermediate, ["vocab"] = Vocab,
    };

    public JsonObject Config(ScalarType dtype) => new()
    {
        ["model_type"] = "llama", ["architectures"] = new JsonArray("LlamaForCausalLM"), ["vocab_size"] = Vocab, ["hidden_size"] = Hidden,
        ["intermediate_size"] = Intermediate, ["num_hidden_layers"] = Layers, ["num_attention_heads"] = Heads, ["num_key_value_heads"] = KvHeads,
        ["head_dim"] = HeadDim, ["hidden_act"] = "silu", ["max_position_embeddings"] = MaxPositions, ["rms_norm_eps"] = 1e-5,
        ["rope_theta"] = RopeTheta, ["attention_bias"] = false, ["mlp_bias"] = false, ["tie_word_embeddings"] = false,
        ["bos_token_id"] = 1, ["eos_token_id"] = 2, ["torch_dtype"] = SafeDTypes.ConfigName(dtype),
    };

    /// <summary>Every tensor in HF layout with the init (std, mean) of the random writer.</summary>
    public IEnumerable<(string Name, long[] Shape, double Std, double Mean)> Layout()
    {
        long h = Hidden, q = (long)Heads * HeadDim, kv = (long)KvHeads * HeadDim, f = Intermediate;
        yield return ("model.embed_tokens.weight", new[] { (long)Vocab, h }, 0.02, 0);
        for (int i = 0; i < Layers; i++)
        {
            string l = $"model.layers.{i}.";
            yield return (l + "self_attn.q_proj.weight", new[] { q, h }, 0.02, 0);
            yield return (l + "self_attn.k_proj.weight", new[] { kv, h }, 0.02, 0);
            yield return (l + "self_attn.v_proj.weight", new[] { kv, h }, 0.02, 0);
            yield return (l + "self_attn.o_proj.weight", new[] { h, q }, 0.02, 0);
            yield return (l + "mlp.gate_proj.weight", new[] { f, h }, 0.02, 0);
            yield return (l + "mlp.up_proj.weight", new[] { f, h }, 0.02, 0);
            yield return (l + "mlp.down_proj.weight", new[] { h, f }, 0.02, 0);
            yield return (l + "input_layernorm.weight", new[] { h }, 0.02, 1);
            yield return (l + "post_attention_layernorm.weight", new[] { h }, 0.02, 1);
        }
        yield return ("model.norm.weight", new[] { h }, 0.02, 1);
        yield return ("lm_head.weight", new[] { (long)Vocab, h }, 0.02, 0);
    }

    public void WriteRandom(string dir, ScalarType dtype, int seed)
    {
        BenchShapes.Write(dir, Layout(), Config(dtype), dtype, seed);
        SyntheticVocabulary.Write(Path.Combine(dir, "tokenizer.model"), Vocab);
    }
}

/// <summary>
/// A Qwen3-MoE architecture (HF layout, per-expert hub names, untied head, q/k norms, every layer sparse), written in
/// BF16 as the released checkpoints are.
/// </summary>
public sealed record MoeShape(string Name, int Layers, int Hidden, int Heads, int KvHeads, int HeadDim, int Experts, int ExpertWidth, int TopK, int Vocab,
    int DenseWidth, int MaxPositions = 40960, double RopeTheta = 1e6) : IBenchShape
{
    public static readonly IReadOnlyDictionary<string, MoeShape> Released = new Dictionary<string, MoeShape>
    {
        ["qwen3-30b-a3b"] = new("qwen3-30b-a3b", 48, 2048, 32, 4, 128, 128, 768, 8, 151936, 6144),
    };

    public ScalarType DiskDType => ScalarType.BFloat16;
    public IBenchShape WithLayers(int layers) => this with { Name = $"{Name}-{layers}l", Layers = layers };

    /// <summary>Projections, causal scores, the router, and top-k experts of 3 GEMMs each.</summary>
    public double BlockFlopsPerToken(int t)
    {
        double q = (double)Heads * HeadDim, kv = (double)KvHeads * HeadDim;
        return Layers * (2.0 * Hidden * (2 * q + 2 * kv) + 2.0 * 2 * (t / 2.0) * q + 2.0 * Hidden * Experts + TopK * 2.0 * 3 * Hidden * ExpertWidth);
    }

    public double HeadFlopsPerToken => 2.0 * Hidden * Vocab;
    /// <summary>Per token: the heads' Gram, and top-k experts' Grams (each token enters k of them).</summary>
    public double GramUnitsSquared => Layers * ((double)Heads * HeadDim * Heads * HeadDim + (double)TopK * ExpertWidth * ExpertWidth);

    public JsonObject Describe() => new()
    {
        ["family"] = "qwen3_moe", ["name"] = Name, ["layers"] = Layers, ["hidden"] = Hidden, ["heads"] = Heads, ["kv_heads"] = KvHeads, ["head_dim"] = HeadDim,
        ["experts"] = Experts, ["expert_intermediate"] = ExpertWidth, ["experts_per_token"] = TopK, ["vocab"] = Vocab,
    };

    public JsonObject Config(ScalarType dtype) => new()
    {
        ["model_type"] = "qwen3_moe", ["architectures"] = new JsonArray("Qwen3MoeForCausalLM"), ["vocab_size"] = Vocab, ["hidden_size"] = Hidden,
        ["intermediate_size"] = DenseWidth, ["moe_intermediate_size"] = ExpertWidth, ["num_hidden_layers"] = Layers, ["num_attention_heads"] = Heads,
        ["num_key_value_heads"] = KvHeads, ["head_dim"] = HeadDim, ["num_experts"] = Experts, ["num_experts_per_tok"] = TopK, ["norm_topk_prob"] = true,
        ["decoder_sparse_step"] = 1, ["mlp_only_layers"] = new JsonArray(), ["hidden_act"] = "silu", ["max_position_embeddings"] = MaxPositions,
        ["rms_norm_eps"] = 1e-6, ["rope_theta"] = RopeTheta, ["rope_scaling"] = null, ["attention_bias"] = false, ["use_sliding_window"] = false,
        ["tie_word_embeddings"] = false, ["bos_token_id"] = 1, ["eos_token_id"] = 2, ["torch_dtype"] = SafeDTypes.ConfigName(dtype),
    };

    public IEnumerable<(string Name, long[] Shape, double Std, double Mean)> Layout()
    {
        long h = Hidden, q = (long)Heads * HeadDim, kv = (long)KvHeads * HeadDim, f = ExpertWidth;
        yield return ("model.embed_tokens.weight", new[] { (long)Vocab, h }, 0.02, 0);
        for (int i = 0; i < Layers; i++)
        {
            string l = $"model.layers.{i}.";
            yield return (l + "self_attn.q_proj.weight", new[] { q, h }, 0.02, 0);
            yield return (l + "self_attn.k_proj.weight", new[] { kv, h }, 0.02, 0);
            yield return (l + "self_attn.v_proj.weight", new[] { kv, h }, 0.02, 0);
            yield return (l + "self_attn.o_proj.weight", new[] { h, q }, 0.02, 0);
            yield return (l + "self_attn.q_norm.weight", new long[] { HeadDim }, 0.02, 1);
            yield return (l + "self_attn.k_norm.weight", new long[] { HeadDim }, 0.02, 1);
            yield return (l + "mlp.gate.weight", new[] { (long)Experts, h }, 0.02, 0);
            for (int e = 0; e < Experts; e++)
            {
                yield return (l + $"mlp.experts.{e}.gate_proj.weight", new[] { f, h }, 0.02, 0);
                yield return (l + $"mlp.experts.{e}.up_proj.weight", new[] { f, h }, 0.02, 0);
                yield return (l + $"mlp.experts.{e}.down_proj.weight", new[] { h, f }, 0.02, 0);
            }
            yield return (l + "input_layernorm.weight", new[] { h }, 0.02, 1);
            yield return (l + "post_attention_layernorm.weight", new[] { h }, 0.02, 1);
        }
        yield return ("model.norm.weight", new[] { h }, 0.02, 1);
        yield return ("lm_head.weight", new[] { (long)Vocab, h }, 0.02, 0);
    }

    public void WriteRandom(string dir, ScalarType dtype, int seed)
    {
        BenchShapes.Write(dir, Layout(), Config(dtype), dtype, seed);
        SyntheticVocabulary.Write(Path.Combine(dir, "tokenizer.model"), Vocab);
    }
}
