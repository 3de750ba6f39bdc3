using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

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
            File.Copy(Path.Combine(Repo.Root, "tokenizers", "opt", f), Path.Combine(dir, f), overwrite: true);
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
