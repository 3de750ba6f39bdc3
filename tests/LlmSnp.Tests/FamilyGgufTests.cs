using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Evaluation;
using LlmSnp.Export;
using LlmSnp.Models;
using LlmSnp.Pruning;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// GGUF export of Qwen3 (arch qwen3), Gemma 2 (gemma2), Gemma 3 (gemma3) and Phi-3 (phi3), checked in llama.cpp itself (LLamaSharp
/// 0.30.0): logits of the fixtures and of uniformly pruned fixtures from the F32 file, llama.cpp's own tokenizer on the
/// exported vocabulary against the independent ids, and everything llama.cpp would compute differently refused in one
/// line before anything is written.
/// </summary>
public sealed class FamilyGgufTests
{
    readonly ITestOutputHelper _out;
    public FamilyGgufTests(ITestOutputHelper output) { _out = output; }

    /// <summary>
    /// llama.cpp F32 against float64 logits, absolute. Qwen3 within 1e-4 (1.2e-6 measured). Gemma within 2e-3: ggml
    /// computes GELU through a float16 lookup table (input and output rounded to F16), which moves these logits (|x| ≤ 3.4)
    /// by up to ~1e-3; with that rounding emulated the two agree to ~1e-6 except past a position where an activation
    /// lands on the other side of an F16 rounding boundary.
    /// </summary>
    static double Tolerance(string fixture) => fixture.StartsWith("gemma") ? 2e-3 : 1e-4;

    double MaxDiff(string gguf, long[] ids, Tensor want, string what)
    {
        using var rt = LlamaCppRuntime.Load(gguf, 64, threads: 1, f32Attention: true);
        var got = rt.Logits(ids.Select(x => (int)x).ToArray());
        using var g = torch.tensor(got.SelectMany(r => r.Select(x => (double)x)).ToArray(), new long[] { got.Length, got[0].Length }, ScalarType.Float64);
        double d = (g - want.to(ScalarType.Float64)).abs().max().item<double>();
        _out.WriteLine($"{what}: llama.cpp F32 file vs float64 logits, max |Δlogit| {d:E2} (logits up to {want.abs().max().item<double>():F2})");
        return d;
    }

    static string Tokenizer(string fixture) => fixture is "qwen3" or "phi4-mini" ? "qwen-bpe" : "gemma-spm";

    /// <summary>
    /// A fixture with its family's tokenizer; Gemma's with query_pre_attn_scalar = head_dim, the only scale llama.cpp's
    /// gemma2/gemma3 compute (the golden fixtures use 24 and 64 with head_dim 32, refused below).
    /// </summary>
    static string Exportable(TempDir tmp, string fixture, string? name = null)
    {
        // Not named "phi3…": llama.cpp gives tokens of a model whose general.name (the directory's) says phi3 Phi-3's own
        // strip attributes by their text, and Phi-3's "</s>" is not in the Gemma-style vocabulary used here.
        string dir = FamilyTokenizerTests.WithTokenizer(tmp, fixture, Tokenizer(fixture), name ?? (fixture == "phi3-mini" ? "mini-spm" : null));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        if (fixture.StartsWith("gemma")) cfg["query_pre_attn_scalar"] = (int)cfg["head_dim"]!;
        // phi3-mini's config names bos 1 / eos 2; the Gemma-style SentencePiece beside it has them the other way round.
        if (fixture == "phi3-mini") { cfg["bos_token_id"] = 2; cfg["eos_token_id"] = 1; cfg["pad_token_id"] = 0; }
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        return dir;
    }

    static Tensor LlmSnpLogits(string dir, long[] ids)
    {
        using var m = ModelFamilies.OpenLanguageModel(dir, CPU, ScalarType.Float64);
        return LlamaTests.Forward(m, torch.tensor(ids, new long[] { 1, ids.Length })).squeeze(0);
    }

    [Theory]
    [InlineData("qwen3", "qwen3")]
    [InlineData("gemma2", "gemma2")]
    [InlineData("gemma3_text", "gemma3")]
    [InlineData("phi3-mini", "phi3")]
    [InlineData("phi4-mini", "phi3")]
    public void LlamaCpp_reproduces_the_logits_and_the_tokenizer_ids(string fixture, string arch)
    {
        using var tmp = new TempDir();
        string dir = Exportable(tmp, fixture);
        string path = tmp.Sub("m.gguf");
        var res = GgufExport.Run(dir, path, GgufDType.F32);
        Assert.Equal(arch, res.Architecture);
        var (ids, golden, _) = GoldenFile.Read(FamilyGoldenTests.Fixture(fixture));
        bool bpe = Tokenizer(fixture) == "qwen-bpe";
        for (int s = 0; s < ids.Length; s++)
        {
            // Fixtures exported as they are: their golden logits directly. Gemma's scale was edited: LlmSnp's forward
            // of the edited config (the golden tests check that forward). llama.cpp picks longrope's factors by its context
            // per sequence, which it pads past phi4-mini's original 32 positions: the long factors, which LlmSnp uses for
            // these 16 tokens once they are given as the short ones.
            using var want = fixture == "phi4-mini" ? LlmSnpLogits(WithLongFactorsAsShort(tmp, dir), ids[s])
                : !fixture.StartsWith("gemma")
                ? torch.tensor(golden[s].SelectMany(x => x).ToArray(), new long[] { golden[s].Length, golden[s][0].Length }, ScalarType.Float64)
                : LlmSnpLogits(dir, ids[s]);
            Assert.True(MaxDiff(path, ids[s], want, $"{fixture} seq {s}") < Tolerance(fixture));
        }
        using var rt = LlamaCppRuntime.Load(path, 64, threads: 1);
        var (texts, expected) = FamilyTokenizerTests.Expected(Tokenizer(fixture));
        // special: llama.cpp makes Gemma's <end_of_turn> a control token by its name (end-of-turn detection), so it
        // matches it in text only when asked to; SentencePiece and LlmSnp match it as the user-defined piece it is.
        for (int i = 0; i < texts.Length; i++) Assert.Equal(expected[i], rt.Tokenize(texts[i], addBos: !bpe, special: true));
        var g = GgufFile.Read(path);
        Assert.Equal(bpe ? "gpt2" : "llama", g.Scalar<string>("tokenizer.ggml.model"));
        if (bpe) Assert.Equal("qwen2", g.Scalar<string>("tokenizer.ggml.pre"));
    }

    static string WithLongFactorsAsShort(TempDir tmp, string dir)
    {
        string to = tmp.Sub(Path.GetFileName(dir) + "-long");
        if (Directory.Exists(to)) return to;
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(dir)) File.Copy(f, Path.Combine(to, Path.GetFileName(f)));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(to, "config.json")))!.AsObject();
        var rs = cfg["rope_scaling"]!.AsObject();
        rs["short_factor"] = rs["long_factor"]!.DeepClone();
        File.WriteAllText(Path.Combine(to, "config.json"), cfg.ToJsonString());
        return to;
    }

    /// <summary>
    /// phi4-mini with an original context of 4096 (of 8192): llama.cpp's context of 64 is within it, so it rotates with the
    /// short factors, and the file's attention factor is HF's √(1 + ln 2 / ln 4096), as LlmSnp's forward of the same config.
    /// </summary>
    [Fact]
    public void LlamaCpp_uses_the_short_longrope_factors_within_the_original_context()
    {
        using var tmp = new TempDir();
        string dir = Exportable(tmp, "phi4-mini");
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        cfg["original_max_position_embeddings"] = 4096;
        cfg["max_position_embeddings"] = 8192;
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        string path = tmp.Sub("m.gguf");
        GgufExport.Run(dir, path, GgufDType.F32);
        var g = GgufFile.Read(path);
        Assert.Equal(4096u, g.Scalar<uint>("phi3.rope.scaling.original_context_length"));
        Assert.Equal((float)Math.Sqrt(1 + Math.Log(2) / Math.Log(4096)), g.Scalar<float>("phi3.rope.scaling.attn_factor"));
        Assert.Equal(12u, g.Scalar<uint>("phi3.rope.dimension_count"));
        var (ids, _, _) = GoldenFile.Read(FamilyGoldenTests.Fixture("phi4-mini"));
        using var want = LlmSnpLogits(dir, ids[0]);
        using var longWant = LlmSnpLogits(WithLongFactorsAsShort(tmp, dir), ids[0]);
        Assert.True((want - longWant).abs().max().ToDouble() > 1e-2);   // the two tables give other logits
        Assert.True(MaxDiff(path, ids[0], want, "phi4-mini, original context 4096") < Tolerance("phi4-mini"));
    }

    /// <summary>
    /// A uniform prune (half the K/V groups and neurons, bias-free reconstruction) exports with the pruned head count and
    /// FFN width, and llama.cpp computes what LlmSnp's forward of the pruned checkpoint computes.
    /// </summary>
    [Theory]
    [InlineData("qwen3")]
    [InlineData("gemma2")]
    [InlineData("gemma3_text")]
    [InlineData("phi3-mini")]
    [InlineData("phi4-mini")]
    public void A_uniformly_pruned_checkpoint_runs_in_llama_cpp_as_in_llmsnp(string fixture)
    {
        using var tmp = new TempDir();
        string src = Exportable(tmp, fixture);
        // llama.cpp's phi3 sizes attention by hidden_size: its checkpoints are pruned in the MLP only.
        var prune = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.5, UniformWidths = true, Reconstruct = ReconstructMode.LstsqNoBias };
        if (fixture.StartsWith("phi")) prune = prune with { Targets = new HashSet<NodeKind> { NodeKind.Mlp } };
        PruneJob.Run(new PruneJobOptions
        {
            ModelDir = src, OutDir = tmp.Sub("out"), CalibSource = TextSources.TinyStories, CalibSamples = 8, CalibSeqLen = 64, Prune = prune,
        }, null);
        string path = tmp.Sub("p.gguf");
        var res = GgufExport.Run(tmp.Sub("out"), path, GgufDType.F32);
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Sub("out"), "config.json")))!;
        Assert.All(res.Layers, l => Assert.Equal(((int)cfg["num_attention_heads"]!, (int)cfg["intermediate_size"]!), (l.Heads, l.FfnDim)));
        var g = GgufFile.Read(path);
        Assert.Equal((uint)(int)cfg["intermediate_size"]!, g.Scalar<uint>($"{res.Architecture}.feed_forward_length"));
        var ids = new long[] { 2, 100, 62, 397, 432, 338, 409, 391, 11, 252, 42, 52, 255, 265, 423, 268, 5, 9, 77, 300 };
        // phi4-mini: llama.cpp's padded context is past the original 32 positions (the long factors; see above).
        using var want = LlmSnpLogits(fixture == "phi4-mini" ? WithLongFactorsAsShort(tmp, tmp.Sub("out")) : tmp.Sub("out"), ids);
        Assert.True(MaxDiff(path, ids, want, $"pruned {fixture}") < Tolerance(fixture));
    }

    /// <summary>
    /// The byte-level BPE vocabulary with each pre-tokenizer llama.cpp knows by name (Qwen2's, Llama 3's regex, GPT-2's
    /// ByteLevel): llama.cpp's tokenizer on the exported file gives the ids of the HF tokenizers library on the tokenizer.json.
    /// </summary>
    [Theory]
    [InlineData("qwen2")]
    [InlineData("llama-bpe")]
    [InlineData("gpt-2")]
    public void Byte_level_bpe_vocabularies_tokenize_in_llama_cpp_as_in_hf_tokenizers(string pre)
    {
        using var tmp = new TempDir();
        string dir = Exportable(tmp, "qwen3");
        var tj = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "tokenizer.json")))!;
        var steps = tj["pre_tokenizer"]!["pretokenizers"]!.AsArray();
        if (pre == "llama-bpe") steps[0]!["pattern"]!["Regex"] = ((string)steps[0]!["pattern"]!["Regex"]!).Replace("\\p{N}|", "\\p{N}{1,3}|");
        if (pre == "gpt-2") tj["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = true };
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), tj.ToJsonString());
        string path = tmp.Sub("v.gguf");
        GgufExport.Run(dir, path, GgufDType.F16);
        Assert.Equal(pre, GgufFile.Read(path).Scalar<string>("tokenizer.ggml.pre"));
        using var hf = HfTokenizer.Load(Path.Combine(dir, "tokenizer.json"));
        using var rt = LlamaCppRuntime.Load(path, 64, threads: 1);
        var (texts, _) = FamilyTokenizerTests.Expected("qwen-bpe");
        string story = File.ReadAllText(Path.Combine(Repo.Root, "eval", "data", "tinystories", "eval.txt"))[..20000];
        foreach (var text in texts.Append(story).Append("Call 1234567 or 12 345.678 now"))
            Assert.Equal(hf.Encode(text), rt.Tokenize(text, addBos: false, special: true));
    }

    static void Refused(string dir, string named)
    {
        string path = Path.Combine(Path.GetDirectoryName(dir)!, Path.GetFileName(dir) + ".gguf");
        var e = Assert.Throws<LlmSnpException>(() => GgufExport.Run(dir, path, GgufDType.F32));
        Assert.Contains(named, e.Message);
        Assert.DoesNotContain("\n", e.Message);
        Assert.False(File.Exists(path));
        Assert.Empty(Directory.GetFiles(Path.GetDirectoryName(path)!, Path.GetFileName(path) + "*"));
    }

    static string Edited(TempDir tmp, string fixture, string name, Action<JsonObject> edit)
    {
        string to = Exportable(tmp, fixture, name);
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(to, "config.json")))!.AsObject();
        edit(cfg);
        File.WriteAllText(Path.Combine(to, "config.json"), cfg.ToJsonString());
        return to;
    }

    [Fact]
    public void What_llama_cpp_would_compute_differently_is_refused_in_one_line()
    {
        using var tmp = new TempDir();
        // Gemma's golden fixtures scale attention by query_pre_attn_scalar ≠ head_dim.
        Refused(FamilyTokenizerTests.WithTokenizer(tmp, "gemma2", "gemma-spm"), "query_pre_attn_scalar");
        Refused(FamilyTokenizerTests.WithTokenizer(tmp, "gemma3_text", "gemma-spm"), "query_pre_attn_scalar");
        Refused(Edited(tmp, "gemma2", "untied", c => c["tie_word_embeddings"] = false), "tie_word_embeddings");
        Refused(Edited(tmp, "gemma2", "odd-sliding", c => c["layer_types"] = new JsonArray("full_attention", "sliding_attention", "full_attention")), "layer_types");
        Refused(Edited(tmp, "gemma3_text", "no-sliding", c => c["layer_types"] = new JsonArray("full_attention", "full_attention", "full_attention")), "layer_types");
        Refused(Edited(tmp, "gemma3_text", "aperiodic", c => c["layer_types"] = new JsonArray("full_attention", "sliding_attention", "sliding_attention")), "layer_types");
        Refused(Edited(tmp, "gemma3_text", "capped", c => c["final_logit_softcapping"] = 30.0), "final_logit_softcapping");
        Refused(Edited(tmp, "gemma2", "erf", c => c["hidden_activation"] = "gelu"), "hidden_activation");
        Refused(Edited(tmp, "qwen3", "swa", c => { c["use_sliding_window"] = true; c["sliding_window"] = 8; c["max_window_layers"] = 1; }), "use_sliding_window");
        Refused(Edited(tmp, "qwen3", "llama3-rope", c => c["rope_scaling"] = new JsonObject
        {
            ["rope_type"] = "llama3", ["factor"] = 8.0, ["low_freq_factor"] = 1.0, ["high_freq_factor"] = 4.0, ["original_max_position_embeddings"] = 64,
        }), "rope_scaling");
        // llama.cpp's phi3 has its sliding window off: a window within the context would compute differently.
        Refused(Edited(tmp, "phi3-mini", "phi-swa", c => c["sliding_window"] = 64), "sliding_window");
        // Qwen3 without its tokenizer.json; a tokenizer.json llama.cpp would split differently.
        string noTok = Edited(tmp, "qwen3", "no-tokenizer", c => { });
        File.Delete(Path.Combine(noTok, "tokenizer.json"));
        Refused(noTok, "tokenizer.json");
        string otherRegex = Edited(tmp, "qwen3", "other-regex", c => { });
        var tj = JsonNode.Parse(File.ReadAllText(Path.Combine(otherRegex, "tokenizer.json")))!;
        tj["pre_tokenizer"]!["pretokenizers"]![0]!["pattern"]!["Regex"] = "\\s+|\\S+";
        File.WriteAllText(Path.Combine(otherRegex, "tokenizer.json"), tj.ToJsonString());
        Refused(otherRegex, "pre_tokenizer");
    }

    /// <summary>Per-layer widths and the reconstructed o_proj bias (the default lstsq) have no place in these architectures.</summary>
    [Theory]
    [InlineData("qwen3")]
    [InlineData("gemma3_text")]
    [InlineData("phi3-mini")]
    public void Per_layer_widths_and_attention_biases_are_refused(string fixture)
    {
        using var tmp = new TempDir();
        string src = Exportable(tmp, fixture);
        PruneJobOptions Job(string outDir, PruneOptions p) => new()
        {
            ModelDir = src, OutDir = outDir, Prune = p, CalibSource = TextSources.TinyStories, CalibSamples = 8, CalibSeqLen = 64,
        };
        PruneJob.Run(Job(tmp.Sub("budget"), new PruneOptions { Policy = RatioPolicyKind.Budget, Amount = 0.4 }), null);
        Refused(tmp.Sub("budget"), "intermediate_sizes");
        PruneJob.Run(Job(tmp.Sub("bias"), new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.5, UniformWidths = true, Targets = new HashSet<NodeKind> { fixture is "qwen3" or "phi3-mini" ? NodeKind.Heads : NodeKind.Mlp } }), null);
        if (fixture == "qwen3") Refused(tmp.Sub("bias"), "o_proj.bias");
        else if (fixture == "phi3-mini") Refused(tmp.Sub("bias"), "num_attention_heads");   // heads removed: fewer than hidden_size spans
        else GgufExport.Run(tmp.Sub("bias"), tmp.Sub("bias.gguf"), GgufDType.F16);   // MLP only: no bias added, exported
    }
}
