using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// Pruning Qwen3, Gemma 2 and Gemma 3 (the golden-family fixtures with their family's tokenizer, calibrated on
/// TinyStories): stock shapes of uniform prunes derived here from the HF classes, the bias rules of their stock classes,
/// per-layer prunes reloaded and re-evaluated, padded copies, the cached forward of pruned blocks, and every ordering,
/// reconstruction and ratio policy.
/// </summary>
public class FamilyPruningTests
{
    public static readonly TheoryData<string> Fixtures = new() { "qwen3", "gemma2", "gemma3_text" };

    internal static string WithTokenizer(TempDir tmp, string fixture) =>
        FamilyTokenizerTests.WithTokenizer(tmp, fixture, fixture == "qwen3" ? "qwen-bpe" : "gemma-spm");

    static PruneJobOptions Job(string model, string outDir, PruneOptions prune, bool eval = false, bool padded = false) => new()
    {
        ModelDir = model, OutDir = outDir, Prune = prune, CalibSource = TextSources.TinyStories, CalibSamples = 8, CalibSeqLen = 64,
        EvalDataset = eval ? TextSources.TinyStories : null, EvalSeqLen = 64, EvalLimit = 8, ExportPadded = padded, MeasureSpeed = false,
    };

    static JsonObject Json(string path) => JsonNode.Parse(File.ReadAllText(path))!.AsObject();
    static int I(JsonObject c, string k, int fallback) => c[k] is JsonNode n ? (int)n : fallback;
    static bool B(JsonObject c, string k, bool fallback) => c[k] is JsonNode n ? (bool)n : fallback;

    /// <summary>
    /// The state dict the stock class builds from config.json, written from transformers' modeling files:
    /// `Qwen3ForCausalLM` (head_dim from config, default 128; `attention_bias` on q, k, v and o; q_norm/k_norm [head_dim];
    /// untied by default), `Gemma2ForCausalLM` (head_dim default 256; `attention_bias` on q, k, v, o; four norms; tied by
    /// default, save_pretrained drops the tied head), `Gemma3ForCausalLM` (Gemma 2's layout plus q_norm/k_norm).
    /// </summary>
    static Dictionary<string, long[]> StockShapes(JsonObject c)
    {
        string type = (string)c["model_type"]!;
        bool qwen = type == "qwen3", gemma3 = type == "gemma3_text";
        int h = I(c, "hidden_size", 0), heads = I(c, "num_attention_heads", 0), inter = I(c, "intermediate_size", 0), v = I(c, "vocab_size", 0);
        int kv = I(c, "num_key_value_heads", qwen ? 32 : 4), d = I(c, "head_dim", qwen ? 128 : 256);
        bool bias = B(c, "attention_bias", false);
        var s = new Dictionary<string, long[]> { ["model.embed_tokens.weight"] = new long[] { v, h }, ["model.norm.weight"] = new long[] { h } };
        if (!B(c, "tie_word_embeddings", !qwen)) s["lm_head.weight"] = new long[] { v, h };
        for (int i = 0; i < I(c, "num_hidden_layers", 0); i++)
        {
            string l = $"model.layers.{i}.";
            foreach (var (n, rows, cols) in new[] { ("q_proj", (long)heads * d, (long)h), ("k_proj", (long)kv * d, h), ("v_proj", (long)kv * d, h), ("o_proj", h, (long)heads * d) })
            {
                s[l + $"self_attn.{n}.weight"] = new[] { rows, cols };
                if (bias) s[l + $"self_attn.{n}.bias"] = new[] { rows };
            }
            if (qwen || gemma3) { s[l + "self_attn.q_norm.weight"] = new long[] { d }; s[l + "self_attn.k_norm.weight"] = new long[] { d }; }
            s[l + "mlp.gate_proj.weight"] = new long[] { inter, h };
            s[l + "mlp.up_proj.weight"] = new long[] { inter, h };
            s[l + "mlp.down_proj.weight"] = new long[] { h, inter };
            var norms = qwen ? new[] { "input_layernorm", "post_attention_layernorm" }
                : new[] { "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm" };
            foreach (var n in norms) s[l + n + ".weight"] = new long[] { h };
        }
        return s;
    }

    static void AssertStockShapes(string dir)
    {
        var want = StockShapes(Json(Path.Combine(dir, "config.json")));
        using var ck = new CheckpointReader(dir);
        var have = ck.Names.ToDictionary(n => n, n => ck.Entry(n).Shape);
        Assert.Empty(have.Keys.Except(want.Keys).OrderBy(x => x));
        Assert.Empty(want.Keys.Except(have.Keys).OrderBy(x => x));
        foreach (var (name, shape) in want)
            Assert.True(shape.SequenceEqual(have[name]), $"{dir}: {name} stored [{string.Join(", ", have[name])}], stock class builds [{string.Join(", ", shape)}]");
    }

    /// <summary>
    /// --uniform at 50 %: the stock fields hold the pruned widths and every stored tensor has the stock class's name and
    /// shape. The default reconstruction takes the mean term on o_proj (the stock classes hold it through
    /// `attention_bias`, which also gives q, k and v zero biases) and the bias-free fit on down_proj (no MLP bias there).
    /// </summary>
    [Theory]
    [MemberData(nameof(Fixtures))]
    public void Uniform_prunes_have_exactly_the_stock_shapes_and_the_stock_bias_rules(string fixture)
    {
        using var tmp = new TempDir();
        string src = WithTokenizer(tmp, fixture);
        var before = Json(Path.Combine(src, "config.json"));
        var outcome = PruneJob.Run(Job(src, tmp.Sub("out"), new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.5, UniformWidths = true }), null);
        var cfg = Json(Path.Combine(tmp.Sub("out"), "config.json"));
        int kvBefore = (int)before["num_key_value_heads"]!, queries = (int)before["num_attention_heads"]! / kvBefore;
        int kvAfter = Math.Max(1, kvBefore - (int)Math.Round(0.5 * kvBefore));
        Assert.Equal(kvAfter, (int)cfg["num_key_value_heads"]!);
        Assert.Equal(kvAfter * queries, (int)cfg["num_attention_heads"]!);
        Assert.Equal((int)before["intermediate_size"]! / 2, (int)cfg["intermediate_size"]!);
        Assert.Equal((int)before["head_dim"]!, (int)cfg["head_dim"]!);
        Assert.True((bool)cfg["attention_bias"]!);
        AssertStockShapes(tmp.Sub("out"));
        var report = outcome.Report;
        Assert.True((bool)report["stock_loadable"]!);
        foreach (var l in report["layers"]!.AsArray())
        {
            bool heads = (string)l!["kind"]! == "heads";
            Assert.Equal(heads ? "lstsq-bias" : "lstsq-nobias", (string)l["reconstruct_used"]!);
            if (!heads) Assert.Equal($"stock {before["model_type"]} down_proj has no bias", (string)l["bias_free_because"]!);
        }
        using var ck = new CheckpointReader(tmp.Sub("out"));
        Assert.True(GgufZero(ck, "model.layers.0.self_attn.q_proj.bias"));
        // Gemma 3's single K/V head stays (a layer keeps one group at least): nothing removed, nothing to compensate.
        Assert.Equal(kvAfter == kvBefore, GgufZero(ck, "model.layers.0.self_attn.o_proj.bias"));
        using var m = ModelFamilies.OpenLanguageModel(tmp.Sub("out"));
        Assert.Equal(outcome.ParamsAfter, m.ParameterCount());
        Assert.Empty(m.UnusedTensors);
    }

    static bool GgufZero(CheckpointReader ck, string name) => LlmSnp.Export.GgufExport.IsZero(ck, name);

    /// <summary>
    /// A per-layer budget prune reloads at its pruned size and re-evaluates to the perplexity the job measured; its
    /// zero-padded copy (original shapes, pruned rows and columns zero) gives the same logits; its blocks, each with its
    /// own widths, decode through the KV cache exactly like the full forward.
    /// </summary>
    [Theory]
    [MemberData(nameof(Fixtures))]
    public void Per_layer_prunes_reload_re_evaluate_alike_and_the_padded_copy_agrees(string fixture)
    {
        using var tmp = new TempDir();
        string src = WithTokenizer(tmp, fixture);
        var outcome = PruneJob.Run(Job(src, tmp.Sub("out"), new PruneOptions { Policy = RatioPolicyKind.Budget, Amount = 0.4 }, eval: true, padded: true), null);
        var cfg = Json(Path.Combine(tmp.Sub("out"), "config.json"));
        Assert.True((bool)cfg["pruned"]!);
        var mlp = cfg["intermediate_sizes"]!.AsArray().Select(x => (int)x!).ToArray();
        Assert.True(mlp.Sum() < 3 * (int)Json(Path.Combine(src, "config.json"))["intermediate_size"]!);
        double dense = outcome.Eval!.Dense, pruned = outcome.Eval.Pruned;
        Assert.True(pruned > dense * 0.9 && double.IsFinite(pruned), $"dense {dense}, pruned {pruned}");

        using var compact = ModelFamilies.OpenLanguageModel(tmp.Sub("out"), CPU, ScalarType.Float64);
        Assert.Equal(outcome.ParamsAfter, compact.ParameterCount());
        var ids = compact.Tokenizer().Encode(TextSources.EvaluationText(TextSources.TinyStories));
        var again = LlmSnp.Evaluation.Perplexity.Evaluate(compact, ids, 64, 8, "tinystories");
        Assert.True(Math.Abs(again.Perplexity / pruned - 1) < 1e-6, $"job (F32) {pruned}, reloaded (F64) {again.Perplexity}");

        using var padded = ModelFamilies.OpenLanguageModel(Path.Combine(tmp.Sub("out"), "padded"), CPU, ScalarType.Float64);
        // The original widths, and the biases the reconstruction added (zero rows where pruned).
        var paddedCfg = Json(Path.Combine(tmp.Sub("out"), "padded", "config.json"));
        Assert.Null(paddedCfg["pruned"]);
        Assert.Equal((int)Json(Path.Combine(src, "config.json"))["intermediate_size"]!, (int)paddedCfg["intermediate_size"]!);
        using (var ck = new CheckpointReader(Path.Combine(tmp.Sub("out"), "padded")))
            Assert.Equal(ck.Names.Sum(n => ck.Entry(n).Shape.Aggregate(1L, (x, y) => x * y)), padded.ParameterCount());
        AssertStockShapes(Path.Combine(tmp.Sub("out"), "padded"));
        using var input = torch.tensor(ids.Take(40).Select(x => (long)x).ToArray(), new long[] { 1, 40 });
        using var a = LlamaTests.Forward(compact, input);
        using var b = LlamaTests.Forward(padded, input);
        Assert.True((a - b).abs().max().item<double>() < 1e-9);
        GenerationTests.AssertCachedEqualsFull(compact, input, $"pruned {fixture}");
    }

    /// <summary>Every ordering (with the default reconstruction) and every reconstruction (with ZCA) prunes each family to a checkpoint that loads and runs.</summary>
    [Theory]
    [MemberData(nameof(Fixtures))]
    public void Every_ordering_reconstruction_and_policy_gives_a_checkpoint_that_loads(string fixture)
    {
        using var tmp = new TempDir();
        string src = WithTokenizer(tmp, fixture);
        var runs = Enum.GetValues<Ordering>().Select(o => (Name: $"o-{o}", Options: new PruneOptions { Ordering = o, Policy = RatioPolicyKind.Ratio, Amount = 0.3 }))
            .Concat(Enum.GetValues<ReconstructMode>().Select(r => (Name: $"r-{r}", Options: new PruneOptions { Reconstruct = r, Policy = RatioPolicyKind.Ratio, Amount = 0.3 })))
            .Append(("variance", new PruneOptions { Policy = RatioPolicyKind.Variance, Amount = 0.95 }))
            .Append(("budget-uniform", new PruneOptions { Policy = RatioPolicyKind.Budget, Amount = 0.3, UniformWidths = true }));
        using var input = torch.arange(3, 35, dtype: ScalarType.Int64).unsqueeze(0);
        foreach (var (name, options) in runs)
        {
            var o = PruneJob.Run(Job(src, tmp.Sub(name), options), null);
            using var m = ModelFamilies.OpenLanguageModel(tmp.Sub(name));
            Assert.Equal(o.ParamsAfter, m.ParameterCount());
            using var logits = LlamaTests.Forward(m, input);
            Assert.True(torch.isfinite(logits).all().item<bool>(), $"{fixture} {name}: non-finite logits");
            Assert.True(o.ParamsAfter < o.ParamsBefore || name == "variance", $"{fixture} {name}: nothing removed");
        }
    }

    /// <summary>
    /// `compare` on Qwen3 and Gemma: each row's perplexity equals what `prune --eval` measures on the written checkpoint
    /// (its timing is the family-independent part CompareTests checks).
    /// </summary>
    [Theory]
    [InlineData("qwen3")]
    [InlineData("gemma2")]
    public void Compare_rows_equal_prune_of_the_same_options(string fixture)
    {
        using var tmp = new TempDir();
        string src = WithTokenizer(tmp, fixture);
        var json = LlmSnp.Reporting.CompareJob.Run(new LlmSnp.Reporting.CompareOptions
        {
            ModelDir = src, OutDir = tmp.Sub("cmp"), Methods = new[] { LlmSnp.Reporting.Method.Parse("zca"), LlmSnp.Reporting.Method.Parse("magnitude") },
            Ratios = new[] { 0.3 }, TargetSets = new[] { "mlp,heads" }, Calib = TextSources.TinyStories, CalibSamples = 8, CalibSeqLen = 64,
            Eval = TextSources.TinyStories, EvalSeqLen = 64, EvalLimit = 8, MeasureSpeed = false,
        }, null);
        var rows = json["rows"]!.AsArray();
        Assert.Equal(2, rows.Count);
        var prune = PruneJob.Run(Job(src, tmp.Sub("zca"), new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.3 }, eval: true), null);
        Assert.Equal(prune.Eval!.Pruned, (double)rows[0]!["metric"]!, 6);
        Assert.Equal(prune.ParamsAfter, (long)rows[0]!["params_after"]!);
        Assert.NotEqual((double)rows[0]!["metric"]!, (double)rows[1]!["metric"]!);
    }

    /// <summary>`generate` on Gemma 3 (sliding and full layers, two RoPE bases) through the CLI: greedy decoding through the KV cache gives the ids a full forward picks at each step.</summary>
    [Fact]
    public void Cli_generate_on_gemma3_follows_the_full_forwards_argmax()
    {
        using var tmp = new TempDir();
        string dir = WithTokenizer(tmp, "gemma3_text");
        string json = tmp.Sub("g.json");
        var r = CliHarness.Run(new[] { "generate", "--model", dir, "--prompt", "Once upon a time", "--max-new-tokens", "12", "--json", json });
        CliHarness.Succeeds(r);
        var g = Json(json);
        using var m = ModelFamilies.OpenLanguageModel(dir);
        var ids = m.Tokenizer().Encode("Once upon a time").Select(x => (long)x).ToList();
        int promptLength = ids.Count;
        for (int k = 0; k < 12; k++)
        {
            using var logits = LlamaTests.Forward(m, torch.tensor(ids.ToArray(), new long[] { 1, ids.Count }));
            ids.Add(logits[0, -1].argmax().item<long>());
        }
        Assert.Equal(12, (int)g["new_tokens"]!);
        Assert.Equal(m.Tokenizer().Decode(ids.Skip(promptLength).Select(x => (int)x)), (string)g["text"]!);
    }
}
