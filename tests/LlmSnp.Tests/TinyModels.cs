using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

// The tests' tiny random checkpoint writers, one per family, and the temporary-directory helpers.

/// <summary>Writes small random OPT checkpoints in HF layout (config.json + model.safetensors).</summary>
public sealed record TinyOpt
{
    public int Vocab { get; init; } = 96;
    public int Hidden { get; init; } = 32;
    public int Heads { get; init; } = 4;
    public int Ffn { get; init; } = 64;
    public int Layers { get; init; } = 2;
    public int MaxPositions { get; init; } = 64;
    public bool PreLayerNorm { get; init; } = true;
    public int? ProjDim { get; init; }
    public bool Tied { get; init; } = true;
    public string Prefix { get; init; } = "model.decoder.";
    public ScalarType DType { get; init; } = ScalarType.Float32;
    public double Scale { get; init; } = 0.15;
    public int Seed { get; init; } = 1234;
    /// <summary>Applied to the tensors before writing (to plant redundancy, zero things, ...).</summary>
    public Action<Dictionary<string, Tensor>>? Edit { get; init; }

    public string Write(string dir)
    {
        Directory.CreateDirectory(dir);
        var gen = new torch.Generator((ulong)Seed);
        int p = ProjDim ?? Hidden;
        Tensor R(params long[] shape) => torch.randn(shape, ScalarType.Float32, generator: gen) * Scale;
        var t = new Dictionary<string, Tensor>(StringComparer.Ordinal)
        {
            [Prefix + "embed_tokens.weight"] = R(Vocab, p),
            [Prefix + "embed_positions.weight"] = R(MaxPositions + 2, Hidden),
        };
        if (p != Hidden)
        {
            t[Prefix + "project_in.weight"] = R(Hidden, p);
            t[Prefix + "project_out.weight"] = R(p, Hidden);
        }
        for (int i = 0; i < Layers; i++)
        {
            string l = $"{Prefix}layers.{i}.";
            foreach (var n in new[] { "q_proj", "k_proj", "v_proj" })
            {
                t[l + $"self_attn.{n}.weight"] = R(Hidden, Hidden);
                t[l + $"self_attn.{n}.bias"] = R(Hidden);
            }
            t[l + "self_attn.out_proj.weight"] = R(Hidden, Hidden);
            t[l + "self_attn.out_proj.bias"] = R(Hidden);
            t[l + "fc1.weight"] = R(Ffn, Hidden) * 2;
            t[l + "fc1.bias"] = R(Ffn);
            t[l + "fc2.weight"] = R(Hidden, Ffn);
            t[l + "fc2.bias"] = R(Hidden);
            foreach (var n in new[] { "self_attn_layer_norm", "final_layer_norm" })
            {
                t[l + n + ".weight"] = 1 + R(Hidden);
                t[l + n + ".bias"] = R(Hidden);
            }
        }
        if (PreLayerNorm)
        {
            t[Prefix + "final_layer_norm.weight"] = 1 + R(Hidden);
            t[Prefix + "final_layer_norm.bias"] = R(Hidden);
        }
        if (!Tied) t["lm_head.weight"] = R(Vocab, p);
        Edit?.Invoke(t);
        SafeTensorsWriter.WriteAll(dir, t.Select(kv => (kv.Key, kv.Value.to(DType))));
        var cfg = new JsonObject
        {
            ["model_type"] = "opt", ["vocab_size"] = Vocab, ["hidden_size"] = Hidden, ["num_hidden_layers"] = Layers,
            ["num_attention_heads"] = Heads, ["ffn_dim"] = Ffn, ["max_position_embeddings"] = MaxPositions,
            ["do_layer_norm_before"] = PreLayerNorm, ["word_embed_proj_dim"] = p, ["activation_function"] = "relu",
            ["enable_bias"] = true, ["layer_norm_elementwise_affine"] = true, ["tie_word_embeddings"] = Tied,
            ["torch_dtype"] = SafeDTypes.ConfigName(DType), ["bos_token_id"] = 2, ["eos_token_id"] = 2, ["pad_token_id"] = 1,
        };
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        CopyTokenizer(dir);
        foreach (var v in t.Values) v.Dispose();
        return dir;
    }

    /// <summary>The bundled OPT tokenizer files, so the checkpoint carries its own tokenizer as a real one does.</summary>
    public static void CopyTokenizer(string dir)
    {
        foreach (var f in new[] { "vocab.json", "merges.txt" })
            File.Copy(Path.Combine(RepoPaths.OptTokenizer, f), Path.Combine(dir, f), overwrite: true);
    }
}

/// <summary>
/// Writes small random LLaMA-family checkpoints in HF layout (config.json + model.safetensors): grouped-query
/// attention (KvHeads below Heads), optional attention/MLP biases, tied or untied head, llama/mistral/qwen2.
/// </summary>
public sealed record TinyLlama
{
    public string ModelType { get; init; } = "llama";
    public int Vocab { get; init; } = 96;
    public int Hidden { get; init; } = 32;
    public int Heads { get; init; } = 4;
    public int KvHeads { get; init; } = 2;
    public int Intermediate { get; init; } = 48;
    public int Layers { get; init; } = 2;
    public int MaxPositions { get; init; } = 64;
    public bool Tied { get; init; }
    public bool AttentionBias { get; init; }
    public bool MlpBias { get; init; }
    public double Scale { get; init; } = 0.15;
    public int Seed { get; init; } = 1234;
    public Action<Dictionary<string, Tensor>>? Edit { get; init; }
    public Action<JsonObject>? EditConfig { get; init; }

    public string Write(string dir)
    {
        Directory.CreateDirectory(dir);
        var gen = new torch.Generator((ulong)Seed);
        Tensor R(params long[] shape) => torch.randn(shape, ScalarType.Float32, generator: gen) * Scale;
        int hd = Hidden / Heads;
        long q = Heads * hd, kv = KvHeads * hd;
        bool qkvBias = AttentionBias || ModelType == "qwen2";   // Qwen2's q/k/v always carry biases
        var t = new Dictionary<string, Tensor>(StringComparer.Ordinal)
        {
            ["model.embed_tokens.weight"] = R(Vocab, Hidden),
            ["model.norm.weight"] = 1 + R(Hidden),
        };
        if (!Tied) t["lm_head.weight"] = R(Vocab, Hidden);
        for (int i = 0; i < Layers; i++)
        {
            string l = $"model.layers.{i}.";
            foreach (var (name, rows, cols, bias) in new[]
            {
                ("self_attn.q_proj", q, (long)Hidden, qkvBias), ("self_attn.k_proj", kv, Hidden, qkvBias), ("self_attn.v_proj", kv, Hidden, qkvBias),
                ("self_attn.o_proj", Hidden, q, AttentionBias), ("mlp.gate_proj", Intermediate, Hidden, MlpBias), ("mlp.up_proj", Intermediate, Hidden, MlpBias),
                ("mlp.down_proj", Hidden, Intermediate, MlpBias),
            })
            {
                t[l + name + ".weight"] = R(rows, cols);
                if (bias) t[l + name + ".bias"] = R(rows);
            }
            t[l + "input_layernorm.weight"] = 1 + R(Hidden);
            t[l + "post_attention_layernorm.weight"] = 1 + R(Hidden);
        }
        Edit?.Invoke(t);
        SafeTensorsWriter.WriteAll(dir, t.Select(kv2 => (kv2.Key, kv2.Value)));
        var cfg = new JsonObject
        {
            ["model_type"] = ModelType, ["vocab_size"] = Vocab, ["hidden_size"] = Hidden, ["intermediate_size"] = Intermediate,
            ["num_hidden_layers"] = Layers, ["num_attention_heads"] = Heads, ["num_key_value_heads"] = KvHeads, ["hidden_act"] = "silu",
            ["max_position_embeddings"] = MaxPositions, ["rms_norm_eps"] = 1e-6, ["rope_theta"] = 10000.0, ["tie_word_embeddings"] = Tied,
            ["attention_bias"] = AttentionBias, ["mlp_bias"] = MlpBias, ["bos_token_id"] = 1, ["eos_token_id"] = 2, ["torch_dtype"] = "float32",
        };
        EditConfig?.Invoke(cfg);
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        foreach (var v in t.Values) v.Dispose();
        return dir;
    }
}

/// <summary>Writes small random ViT (or distilled DeiT) classifiers in HF layout: 32×32 images, 8×8 patches, 10 classes.</summary>
public sealed record TinyVit
{
    public bool Distilled { get; init; }
    public int Seed { get; init; } = 3;
    public Action<JsonObject>? EditConfig { get; init; }

    public string Write(string dir)
    {
        Directory.CreateDirectory(dir);
        var gen = new torch.Generator((ulong)Seed);
        Tensor R(params long[] s) => torch.randn(s, ScalarType.Float32, generator: gen) * 0.2;
        int d = 32, layers = 2, mlp = 64, classes = 10, tokens = 1 + (Distilled ? 1 : 0) + 16;
        string p = Distilled ? "deit." : "vit.";
        var t = new Dictionary<string, Tensor>
        {
            [p + "embeddings.cls_token"] = R(1, 1, d), [p + "embeddings.position_embeddings"] = R(1, tokens, d),
            [p + "embeddings.patch_embeddings.projection.weight"] = R(d, 3, 8, 8), [p + "embeddings.patch_embeddings.projection.bias"] = R(d),
            [p + "layernorm.weight"] = 1 + R(d), [p + "layernorm.bias"] = R(d),
        };
        if (Distilled)
        {
            t[p + "embeddings.distillation_token"] = R(1, 1, d);
            foreach (var h in new[] { "cls_classifier", "distillation_classifier" }) { t[h + ".weight"] = R(classes, d); t[h + ".bias"] = R(classes); }
        }
        else { t["classifier.weight"] = R(classes, d); t["classifier.bias"] = R(classes); }
        for (int i = 0; i < layers; i++)
        {
            string l = $"{p}encoder.layer.{i}.";
            foreach (var n in new[] { "attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense" }) { t[l + n + ".weight"] = R(d, d); t[l + n + ".bias"] = R(d); }
            foreach (var n in new[] { "layernorm_before", "layernorm_after" }) { t[l + n + ".weight"] = 1 + R(d); t[l + n + ".bias"] = R(d); }
            t[l + "intermediate.dense.weight"] = R(mlp, d); t[l + "intermediate.dense.bias"] = R(mlp);
            t[l + "output.dense.weight"] = R(d, mlp); t[l + "output.dense.bias"] = R(d);
        }
        SafeTensorsWriter.WriteAll(dir, t.Select(kv => (kv.Key, kv.Value)));
        var cfg = new JsonObject
        {
            ["model_type"] = Distilled ? "deit" : "vit", ["hidden_size"] = d, ["num_hidden_layers"] = layers, ["num_attention_heads"] = 4,
            ["intermediate_size"] = mlp, ["image_size"] = 32, ["patch_size"] = 8, ["num_channels"] = 3, ["layer_norm_eps"] = 1e-12,
            ["hidden_act"] = "gelu", ["qkv_bias"] = true,
        };
        EditConfig?.Invoke(cfg);
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        foreach (var v in t.Values) v.Dispose();
        return dir;
    }
}

/// <summary>A temporary directory removed at the end of a test.</summary>
public sealed class TempDir : IDisposable
{
    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "llmsnp-test-" + Guid.NewGuid().ToString("N"));
    public TempDir() { Directory.CreateDirectory(Path); }
    public string Sub(string name) => System.IO.Path.Combine(Path, name);
    public void Dispose() { try { Directory.Delete(Path, true); } catch (IOException) { } }
}

public static class Repo
{
    public static string Root
    {
        get
        {
            for (var d = new DirectoryInfo(AppContext.BaseDirectory); d != null; d = d.Parent)
                if (File.Exists(System.IO.Path.Combine(d.FullName, "LlmSnp.sln"))) return d.FullName;
            throw new InvalidOperationException("repository root not found");
        }
    }
    public static string Fixture(string name) => System.IO.Path.Combine(Root, "tests", "fixtures", name);
}
