using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Evaluation;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>The LLaMA family (Llama, Mistral, Qwen2): forward against float64 references, tokenizers, pruning, bad input.</summary>
public class LlamaTests
{
    static string Stories => Path.Combine(Repo.Root, "models", "stories260k");
    static string TinyStoriesDir => Path.Combine(Repo.Root, "eval", "data", "tinystories");

    static int[] Ids(string file) => JsonSerializer.Deserialize<int[]>(File.ReadAllText(Path.Combine(TinyStoriesDir, file)))!;

    /// <summary>Full forward with every block in turn (the streamed path the jobs use, one sequence).</summary>
    internal static Tensor Forward(IPrunableModel m, Tensor ids)
    {
        using var scope = NewDisposeScope();
        var h = m.Embed(ids);
        for (int i = 0; i < m.BlockCount; i++)
            using (var b = m.LoadBlock(i)) h = b.Forward(h)!;
        return m.Head(h).MoveToOuterDisposeScope();
    }

    /// <summary>The golden logits are written to 7 decimals: F64 agrees to that rounding (≤ 5e-8), F32 to 1e-4.</summary>
    [Theory]
    [InlineData("golden-llama/llama-gqa-untied", ScalarType.Float32, 1e-4)]
    [InlineData("golden-llama/llama-gqa-untied", ScalarType.Float64, 5.1e-8)]
    [InlineData("golden-llama/qwen2-bias-tied", ScalarType.Float32, 1e-4)]
    [InlineData("golden-llama/qwen2-bias-tied", ScalarType.Float64, 5.1e-8)]
    [InlineData("golden-llama/mistral-f16", ScalarType.Float32, 1e-4)]
    [InlineData("golden-llama/mistral-f16", ScalarType.Float64, 5.1e-8)]
    [InlineData("stories260k", ScalarType.Float32, 1e-4)]
    [InlineData("stories260k", ScalarType.Float64, 5.1e-8)]
    public void Forward_matches_independent_float64_reference(string fixture, ScalarType dtype, double tol)
    {
        string dir = fixture == "stories260k" ? Stories : Repo.Fixture(fixture);
        var (ids, logits, nll) = GoldenFile.Read(dir);
        using var model = ModelFamilies.OpenLanguageModel(dir, CPU, dtype);
        Assert.Equal("llama", model.Family);
        for (int s = 0; s < ids.Length; s++)
        {
            using var input = torch.tensor(ids[s], new long[] { 1, ids[s].Length });
            using var got = Forward(model, input).squeeze(0).to(ScalarType.Float64);
            using var want = torch.tensor(logits[s].SelectMany(x => x).ToArray(), new long[] { logits[s].Length, logits[s][0].Length }, ScalarType.Float64);
            double maxAbs = (got - want).abs().max().item<double>();
            Assert.True(maxAbs < tol, $"{fixture} seq {s}: max |Δlogit| = {maxAbs:G3} ≥ {tol}");
            var ppl = Perplexity.Evaluate(model, ids[s].Select(x => (int)x).ToArray(), ids[s].Length, null, "golden");
            Assert.InRange(ppl.FirstWindowNll, nll[s] - 1e-4, nll[s] + 1e-4);
        }
    }

    /// <summary>TinyLlama's GQA-with-biases checkpoint is read whole: every written tensor counted, none reported unused.</summary>
    [Theory]
    [InlineData("llama", true, true, false)]
    [InlineData("qwen2", false, false, true)]
    public void Tiny_llama_writer_checkpoints_open_whole_and_run(string type, bool attnBias, bool mlpBias, bool tied)
    {
        using var tmp = new TempDir();
        var spec = new TinyLlama { ModelType = type, AttentionBias = attnBias, MlpBias = mlpBias, Tied = tied, KvHeads = 1 };
        string dir = spec.Write(tmp.Sub("m"));
        using var m = (LlmSnp.Models.ILanguageModel)LlmSnp.Models.ModelFamilies.Open(dir);
        Assert.Empty(m.UnusedTensors);
        using var ck = new LlmSnp.Checkpoint.CheckpointReader(dir);
        Assert.Equal(ck.Names.Sum(n => ck.Entry(n).Shape.Aggregate(1L, (a, d) => a * d)), m.ParameterCount());
        using var scope = torch.NewDisposeScope();
        var h = m.Embed(torch.arange(6, ScalarType.Int64).unsqueeze(0));
        for (int i = 0; i < m.BlockCount; i++) { using var b = m.LoadBlock(i); h = b.Forward(h)!; }
        var logits = m.Head(h);
        Assert.Equal(new long[] { 1, 6, spec.Vocab }, logits.shape);
        Assert.True(torch.isfinite(logits).all().item<bool>());
    }

    [Fact]
    public void SentencePiece_tokenizer_reproduces_the_golden_ids()
    {
        var tok = TextTokenizers.ForModel(Stories);
        Assert.IsType<SentencePieceTokenizer>(tok);
        Assert.Equal(1, tok.BosId);
        Assert.Equal(Ids("eval.ids.json"), tok.Encode(File.ReadAllText(Path.Combine(TinyStoriesDir, "eval.txt"))));
        Assert.Equal(Ids("calib.ids.json"), tok.Encode(File.ReadAllText(Path.Combine(TinyStoriesDir, "calib.txt"))));
    }

    /// <summary>A tokenizer.json written from the bundled OPT vocabulary and merges, through the HF tokenizers library, against the OPT BPE ids.</summary>
    [Fact]
    public void Tokenizer_json_loads_through_hf_tokenizers_and_matches_the_opt_ids()
    {
        using var tmp = new TempDir();
        string dir = tmp.Sub("m");
        Directory.CreateDirectory(dir);
        var optDir = RepoPaths.OptTokenizer;
        var vocab = JsonNode.Parse(File.ReadAllText(Path.Combine(optDir, "vocab.json")))!;
        var merges = File.ReadLines(Path.Combine(optDir, "merges.txt")).Where(l => l.Length > 0 && !l.StartsWith("#version")).Select(l => (JsonNode)l).ToArray();
        JsonObject Special(string which) => new() { ["SpecialToken"] = new JsonObject { ["id"] = which, ["type_id"] = 0 } };
        var json = new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = new JsonArray(new JsonObject { ["id"] = 2, ["content"] = "</s>", ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false, ["normalized"] = false, ["special"] = true }),
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = true },
            ["post_processor"] = new JsonObject
            {
                ["type"] = "TemplateProcessing",
                ["single"] = new JsonArray(Special("</s>"), new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } }),
                ["pair"] = new JsonArray(Special("</s>"), new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } }, new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "B", ["type_id"] = 1 } }),
                ["special_tokens"] = new JsonObject { ["</s>"] = new JsonObject { ["id"] = "</s>", ["ids"] = new JsonArray(2), ["tokens"] = new JsonArray("</s>") } },
            },
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = true, ["use_regex"] = true },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = "", ["end_of_word_suffix"] = "",
                ["fuse_unk"] = false, ["byte_fallback"] = false, ["vocab"] = vocab.DeepClone(), ["merges"] = new JsonArray(merges),
            },
        };
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), json.ToJsonString());
        var hf = TextTokenizers.ForModel(dir);
        Assert.IsType<HfTokenizer>(hf);
        Assert.Equal(2, hf.BosId);
        Assert.Equal(new[] { 2, 31414, 6, 127, 2335, 16, 11962 }, hf.Encode("Hello, my dog is cute"));   // the OPT golden ids
        var text = string.Join("\n\n", TextSources.ReadRows(TextSources.WikiText2Path).Take(400));
        Assert.Equal(OptTokenizer.Bundled().Encode(text), hf.Encode(text));
    }

    [Fact]
    public void No_tokenizer_is_an_error_never_another_models()
    {
        using var tmp = new TempDir();
        string dir = CopyStories(tmp.Sub("m"), cfg => { });
        File.Delete(Path.Combine(dir, "tokenizer.model"));
        using var m = ModelFamilies.OpenLanguageModel(dir);
        var e = Assert.Throws<LlmSnpException>(() => m.Tokenizer());
        Assert.Contains("no tokenizer", e.Message);
        Assert.Contains(dir, e.Message);
    }

    [Fact]
    public void TinyStories_perplexity_matches_the_float64_reference()
    {
        using var model = ModelFamilies.OpenLanguageModel(Stories);
        var ids = model.Tokenizer().Encode(TextSources.EvaluationText(TextSources.TinyStories));
        Assert.Equal(Ids("eval.ids.json"), ids);
        var all = Perplexity.Evaluate(model, ids, 512, null, "tinystories");
        Assert.Equal(334, all.Windows);
        Assert.True(Math.Abs(all.Perplexity / 3.865407272775369 - 1) < 1e-4, $"all 334 windows: {all.Perplexity}");
        var first = Perplexity.Evaluate(model, ids, 512, 40, "tinystories");
        Assert.True(Math.Abs(first.Perplexity / 3.7386466640924603 - 1) < 1e-4, $"first 40 windows: {first.Perplexity}");
    }

    /// <summary>Copies stories260K with an edited config (for bad-input and layout cases).</summary>
    static string CopyStories(string dir, Action<JsonObject> edit)
    {
        Directory.CreateDirectory(dir);
        foreach (var f in new[] { "model.safetensors", "tokenizer.model", "tokenizer_config.json" }) File.Copy(Path.Combine(Stories, f), Path.Combine(dir, f));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(Stories, "config.json")))!.AsObject();
        edit(cfg);
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        return dir;
    }

    [Theory]
    [InlineData("rope_scaling", "{\"rope_type\": \"mrope\", \"factor\": 2.0}", "rope_scaling")]
    [InlineData("hidden_act", "\"gelu\"", "hidden_act")]
    [InlineData("num_key_value_heads", "3", "num_key_value_heads")]
    [InlineData("head_dim", "16", "self_attn.q_proj.weight")]
    public void Bad_config_is_one_line_naming_the_field_or_tensor(string field, string value, string named)
    {
        using var tmp = new TempDir();
        string dir = CopyStories(tmp.Sub("m"), cfg => cfg[field] = JsonNode.Parse(value));
        var e = Assert.Throws<LlmSnpException>(() =>
        {
            using var m = ModelFamilies.OpenLanguageModel(dir);
            using var b = m.LoadBlock(0);
        });
        Assert.Contains(named, e.Message);
        Assert.DoesNotContain("\n", e.Message);
    }

    [Fact]
    public void Rope_scaling_linear_and_llama3_follow_hf()
    {
        var inv = Enumerable.Range(0, 4).Select(i => 1.0 / Math.Pow(10000, 2.0 * i / 8)).ToArray();
        var linear = new RopeScaling("linear", 4, 1, 1, 512).InverseFrequencies(8, 10000);
        Assert.Equal(inv.Select(x => x / 4), linear);
        // llama3: high frequencies kept, low ones divided by the factor, the band between interpolated.
        var l3 = new RopeScaling("llama3", 8, 1, 4, 64).InverseFrequencies(8, 10000);
        for (int i = 0; i < 4; i++)
        {
            double wavelen = 2 * Math.PI / inv[i];
            if (wavelen < 64 / 4.0) Assert.Equal(inv[i], l3[i]);
            else if (wavelen > 64) Assert.Equal(inv[i] / 8, l3[i], 15);
            else Assert.InRange(l3[i], inv[i] / 8, inv[i]);
        }
    }

    /// <summary>The Mistral fixture with a sliding window shorter than its test sequences.</summary>
    internal static string MistralWithWindow(TempDir tmp, int window)
    {
        string src = Repo.Fixture("golden-llama/mistral-f16"), dir = tmp.Sub("w");
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(src, "model.safetensors"), Path.Combine(dir, "model.safetensors"));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(src, "config.json")))!.AsObject();
        cfg["sliding_window"] = window;
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        return dir;
    }

    [Fact]
    public void Mistral_sliding_window_changes_only_positions_past_the_window()
    {
        string src = Repo.Fixture("golden-llama/mistral-f16");
        using var tmp = new TempDir();
        string dir = LlamaTests.MistralWithWindow(tmp, 5);
        using var full = ModelFamilies.OpenLanguageModel(src, CPU, ScalarType.Float64);
        using var windowed = ModelFamilies.OpenLanguageModel(dir, CPU, ScalarType.Float64);
        using var ids = torch.arange(1, 17, dtype: ScalarType.Int64).unsqueeze(0);
        using var a = Forward(full, ids);
        using var b = Forward(windowed, ids);
        Assert.True((a.narrow(1, 0, 5) - b.narrow(1, 0, 5)).abs().max().item<double>() < 1e-12);   // inside the window: identical
        Assert.True((a.narrow(1, 5, 11) - b.narrow(1, 5, 11)).abs().max().item<double>() > 1e-6);  // past it: the window applies
    }

    static PruneJobOptions Job(string outDir, PruneOptions prune, bool padded = false) => new()
    {
        ModelDir = Stories, OutDir = outDir, Prune = prune, CalibSource = TextSources.TinyStories, CalibSamples = 16, CalibSeqLen = 256,
        EvalDataset = TextSources.TinyStories, EvalSeqLen = 256, EvalLimit = 20, ExportPadded = padded,
    };

    /// <summary>
    /// A per-layer prune (budget policy: τ chosen over the model, K/V groups and neurons) reloads at its pruned size and
    /// evaluates to the same perplexity; its zero-padded copy, at the original shapes, gives the same logits.
    /// </summary>
    [Fact]
    public void Pruned_stories260k_reloads_and_its_padded_copy_agrees()
    {
        using var tmp = new TempDir();
        var report = PruneJob.Run(Job(tmp.Sub("out"), new PruneOptions { Policy = RatioPolicyKind.Budget, Amount = 0.3 }, padded: true), null);
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Sub("out"), "config.json")))!.AsObject();
        var kv = cfg["num_key_value_heads_per_layer"]!.AsArray().Select(x => (int)x!).ToArray();
        var heads = cfg["num_heads_per_layer"]!.AsArray().Select(x => (int)x!).ToArray();
        Assert.Equal(kv.Select(k => 2 * k), heads);   // whole K/V groups: 2 query heads each
        Assert.True(kv.Sum() < 20 && cfg["intermediate_sizes"]!.AsArray().Sum(x => (int)x!) < 5 * 172);
        double pruned = report.Eval!.Pruned, dense = report.Eval.Dense;
        Assert.True(pruned > dense && pruned < dense * 5, $"dense {dense}, pruned {pruned}");
        using var compact = ModelFamilies.OpenLanguageModel(tmp.Sub("out"), CPU, ScalarType.Float64);
        using var padded = ModelFamilies.OpenLanguageModel(Path.Combine(tmp.Sub("out"), "padded"), CPU, ScalarType.Float64);
        Assert.Equal(report.ParamsAfter, compact.ParameterCount());
        // Speed of both, measured in the same run: LlmSnp's cached forward and llama.cpp on the exported GGUF.
        Assert.NotNull(report.Speed);
        Assert.True(report.Speed!.PrefillSpeedUp > 0 && report.Speed.DecodeSpeedUp > 0 && report.Speed.FlopRatio > 1);
        Assert.NotNull(report.Speed.Dense.LlamaCpp);
        Assert.True(report.Speed.Pruned.LlamaCpp is not null || report.Speed.Pruned.LlamaCppSkipped is not null);
        using var ids = torch.tensor(Ids("eval.ids.json").Take(64).Select(x => (long)x).ToArray(), new long[] { 1, 64 });
        using var a = Forward(compact, ids);
        using var b = Forward(padded, ids);
        Assert.True((a - b).abs().max().item<double>() < 1e-5);
    }

    /// <summary>A uniform prune writes the stock config fields at the pruned widths; a reconstruction with the mean term turns on the bias flags.</summary>
    [Fact]
    public void Uniform_prune_has_stock_widths_and_bias_reconstruction_sets_the_flags()
    {
        using var tmp = new TempDir();
        PruneJob.Run(Job(tmp.Sub("u"), new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.25, Reconstruct = ReconstructMode.LstsqBias }), null);
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Sub("u"), "config.json")))!.AsObject();
        Assert.Equal(129, (int)cfg["intermediate_size"]!);
        Assert.Equal(3, (int)cfg["num_key_value_heads"]!);
        Assert.Equal(6, (int)cfg["num_attention_heads"]!);
        Assert.Equal(8, (int)cfg["head_dim"]!);
        Assert.True((bool)cfg["mlp_bias"]! && (bool)cfg["attention_bias"]!);
        using var ck = new CheckpointReader(tmp.Sub("u"));
        Assert.Equal(new long[] { 64 }, ck.Entry("model.layers.0.mlp.down_proj.bias").Shape);
        Assert.Equal(new long[] { 129 }, ck.Entry("model.layers.0.mlp.gate_proj.bias").Shape);
        Assert.Equal(new long[] { 24 }, ck.Entry("model.layers.0.self_attn.k_proj.bias").Shape);
        // The bias-free form adds none.
        PruneJob.Run(Job(tmp.Sub("n"), new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.25, Reconstruct = ReconstructMode.LstsqNoBias }), null);
        using var cn = new CheckpointReader(tmp.Sub("n"));
        Assert.False(cn.Has("model.layers.0.mlp.down_proj.bias"));
        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Sub("n"), PrunedCheckpoint.ReportFile)))!;
        Assert.All(report["layers"]!.AsArray(), l => Assert.False((bool)l!["reconstruct_constant"]!));
        // The default, lstsq, takes the mean term where the stock Llama class holds the bias: the same weights as lstsq-bias.
        PruneJob.Run(Job(tmp.Sub("d"), new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.25 }) with { EvalDataset = null, MeasureSpeed = false }, null);
        Assert.Equal(File.ReadAllBytes(Path.Combine(tmp.Sub("u"), "model.safetensors")), File.ReadAllBytes(Path.Combine(tmp.Sub("d"), "model.safetensors")));
    }

    /// <summary>The bias-free least squares against a direct solve on the activations (uncentred: no constant column).</summary>
    [Fact]
    public void Bias_free_reconstruction_is_the_uncentred_least_squares_solution()
    {
        var gen = new torch.Generator(5);
        using var acts = torch.randn(new long[] { 400, 6 }, ScalarType.Float64, generator: gen) + 0.7;
        using var w = torch.randn(new long[] { 3, 6 }, ScalarType.Float64, generator: gen);
        using var acc = new GramAccumulator(6, CPU);
        acc.Add(acts);
        using var g = acc.Result("t");
        long[] kept = { 0, 2, 3 }, pruned = { 1, 4, 5 };
        var rec = Subspace.Reconstruct(g, w, null, kept, pruned, ReconstructMode.Lstsq, 0, "t");
        Assert.Null(rec.Bias);
        Assert.False(rec.Constant);
        var xk = acts.index_select(1, torch.tensor(kept));
        var beta = torch.linalg.lstsq(xk, acts.index_select(1, torch.tensor(pruned))).Solution;
        var direct = w.index_select(1, torch.tensor(kept)) + w.index_select(1, torch.tensor(pruned)).mm(beta.t());
        Assert.True((rec.Weight - direct).abs().max().item<double>() < 1e-9);
        // Its reported error is the mean squared output error of the fit.
        var err = (acts.mm(w.t()) - xk.mm(rec.Weight.t())).square().sum(1).mean().item<double>();
        Assert.True(Math.Abs(rec.Error - err) < 1e-9 * err);
    }

    [Fact]
    public void Text_shorter_than_one_window_is_one_line_naming_the_file()
    {
        using var tmp = new TempDir();
        string txt = tmp.Sub("short.txt");
        File.WriteAllText(txt, "Once upon a time.");
        using var model = ModelFamilies.OpenLanguageModel(Stories);
        var e = Assert.Throws<LlmSnpException>(() => PerplexityJob.Measure(model, PerplexityJob.Tokenize(model, txt, null), txt, 256, null, null));
        Assert.Contains(txt, e.Message);
        var c = Assert.Throws<LlmSnpException>(() => CalibrationSet.Sample(model.Tokenizer(), txt, 4, 256, 0));
        Assert.Contains("short.txt", c.Message);
    }
}
