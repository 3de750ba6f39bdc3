using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// Pruned checkpoints that the stock HF classes build from config.json alone: the state-dict shapes each class derives
/// from a config are written here from transformers' modeling_opt / modeling_vit / modeling_llama (mistral, qwen2),
/// independently of LlmSnp's loaders, and every stored tensor of uniform prunes is checked against them.
/// </summary>
public class StockLoadTests
{
    static string Model(string name) => Path.Combine(Repo.Root, "models", name);

    static int I(JsonObject c, string k) => (int)c[k]!;
    static int I(JsonObject c, string k, int fallback) => c[k] is JsonNode n ? (int)n : fallback;
    static bool B(JsonObject c, string k, bool fallback) => c[k] is JsonNode n ? (bool)n : fallback;

    /// <summary>OPTForCausalLM (save_pretrained drops a tied lm_head): attention is hidden → hidden whatever the heads.</summary>
    static Dictionary<string, long[]> OptShapes(JsonObject c)
    {
        int h = I(c, "hidden_size"), f = I(c, "ffn_dim"), v = I(c, "vocab_size"), pos = I(c, "max_position_embeddings"), proj = I(c, "word_embed_proj_dim", h);
        const string p = "model.decoder.";
        var s = new Dictionary<string, long[]>
        {
            [p + "embed_tokens.weight"] = new long[] { v, proj }, [p + "embed_positions.weight"] = new long[] { pos + 2, h },
        };
        if (B(c, "do_layer_norm_before", true)) { s[p + "final_layer_norm.weight"] = new long[] { h }; s[p + "final_layer_norm.bias"] = new long[] { h }; }
        if (proj != h) { s[p + "project_in.weight"] = new long[] { h, proj }; s[p + "project_out.weight"] = new long[] { proj, h }; }
        if (!B(c, "tie_word_embeddings", true)) s["lm_head.weight"] = new long[] { v, proj };
        for (int i = 0; i < I(c, "num_hidden_layers"); i++)
        {
            string l = $"{p}layers.{i}.";
            foreach (var n in new[] { "q_proj", "k_proj", "v_proj", "out_proj" }) { s[l + $"self_attn.{n}.weight"] = new long[] { h, h }; s[l + $"self_attn.{n}.bias"] = new long[] { h }; }
            s[l + "fc1.weight"] = new long[] { f, h }; s[l + "fc1.bias"] = new long[] { f };
            s[l + "fc2.weight"] = new long[] { h, f }; s[l + "fc2.bias"] = new long[] { h };
            foreach (var n in new[] { "self_attn_layer_norm", "final_layer_norm" }) { s[l + n + ".weight"] = new long[] { h }; s[l + n + ".bias"] = new long[] { h }; }
        }
        return s;
    }

    /// <summary>ViTForImageClassification: ViTModel without pooler, heads of hidden / num_attention_heads, then prune_heads(config.pruned_heads).</summary>
    static Dictionary<string, long[]> VitShapes(JsonObject c)
    {
        int h = I(c, "hidden_size"), heads = I(c, "num_attention_heads"), inter = I(c, "intermediate_size"), ch = I(c, "num_channels", 3);
        int img = I(c, "image_size", 224), patch = I(c, "patch_size", 16), labels = c["id2label"]!.AsObject().Count, d = h / heads;
        bool qkvBias = B(c, "qkv_bias", true);
        var pruned = c["pruned_heads"] as JsonObject;
        var s = new Dictionary<string, long[]>
        {
            ["vit.embeddings.cls_token"] = new long[] { 1, 1, h },
            ["vit.embeddings.position_embeddings"] = new long[] { 1, (img / patch) * (img / patch) + 1, h },
            ["vit.embeddings.patch_embeddings.projection.weight"] = new long[] { h, ch, patch, patch },
            ["vit.embeddings.patch_embeddings.projection.bias"] = new long[] { h },
            ["vit.layernorm.weight"] = new long[] { h }, ["vit.layernorm.bias"] = new long[] { h },
            ["classifier.weight"] = new long[] { labels, h }, ["classifier.bias"] = new long[] { labels },
        };
        for (int i = 0; i < I(c, "num_hidden_layers"); i++)
        {
            int removed = pruned?[i.ToString()] is JsonArray a ? a.Select(x => (int)x!).Distinct().Count() : 0;
            long all = (long)(heads - removed) * d;
            string l = $"vit.encoder.layer.{i}.";
            foreach (var n in new[] { "query", "key", "value" })
            {
                s[l + $"attention.attention.{n}.weight"] = new[] { all, h };
                if (qkvBias) s[l + $"attention.attention.{n}.bias"] = new[] { all };
            }
            s[l + "attention.output.dense.weight"] = new[] { h, all }; s[l + "attention.output.dense.bias"] = new long[] { h };
            s[l + "intermediate.dense.weight"] = new long[] { inter, h }; s[l + "intermediate.dense.bias"] = new long[] { inter };
            s[l + "output.dense.weight"] = new long[] { h, inter }; s[l + "output.dense.bias"] = new long[] { h };
            foreach (var n in new[] { "layernorm_before", "layernorm_after" }) { s[l + n + ".weight"] = new long[] { h }; s[l + n + ".bias"] = new long[] { h }; }
        }
        return s;
    }

    /// <summary>
    /// LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM: head_dim from config (else hidden / heads); biases:
    /// Llama per attention_bias (q, k, v, o) and mlp_bias; Mistral none; Qwen2 q, k, v always, o and the MLP never.
    /// </summary>
    static Dictionary<string, long[]> LlamaShapes(JsonObject c)
    {
        string type = (string)c["model_type"]!;
        int h = I(c, "hidden_size"), heads = I(c, "num_attention_heads"), kv = I(c, "num_key_value_heads", heads), inter = I(c, "intermediate_size"), v = I(c, "vocab_size");
        int d = I(c, "head_dim", h / heads);
        bool llama = type == "llama";
        bool qkvBias = type == "qwen2" || (llama && B(c, "attention_bias", false)), oBias = llama && B(c, "attention_bias", false), mlpBias = llama && B(c, "mlp_bias", false);
        var s = new Dictionary<string, long[]> { ["model.embed_tokens.weight"] = new long[] { v, h }, ["model.norm.weight"] = new long[] { h } };
        if (!B(c, "tie_word_embeddings", false)) s["lm_head.weight"] = new long[] { v, h };
        for (int i = 0; i < I(c, "num_hidden_layers"); i++)
        {
            string l = $"model.layers.{i}.";
            foreach (var (n, rows, cols, bias) in new[]
            {
                ("self_attn.q_proj", (long)heads * d, (long)h, qkvBias), ("self_attn.k_proj", (long)kv * d, h, qkvBias), ("self_attn.v_proj", (long)kv * d, h, qkvBias),
                ("self_attn.o_proj", h, (long)heads * d, oBias), ("mlp.gate_proj", inter, h, mlpBias), ("mlp.up_proj", inter, h, mlpBias), ("mlp.down_proj", h, inter, mlpBias),
            })
            {
                s[l + n + ".weight"] = new[] { rows, cols };
                if (bias) s[l + n + ".bias"] = new[] { rows };
            }
            s[l + "input_layernorm.weight"] = new long[] { h };
            s[l + "post_attention_layernorm.weight"] = new long[] { h };
        }
        return s;
    }

    /// <summary>
    /// MixtralForCausalLM as the hub stores it (transformers 4.48's per-expert modules; 5.x converts these names on load):
    /// head_dim = config.head_dim or hidden // heads, no attention biases, `block_sparse_moe.gate` [num_local_experts,
    /// hidden], experts' w1/w3 [intermediate_size, hidden] and w2 [hidden, intermediate_size].
    /// </summary>
    static Dictionary<string, long[]> MixtralShapes(JsonObject c)
    {
        int h = I(c, "hidden_size"), heads = I(c, "num_attention_heads"), kv = I(c, "num_key_value_heads", heads), ff = I(c, "intermediate_size"), v = I(c, "vocab_size");
        int d = I(c, "head_dim", h / heads), experts = I(c, "num_local_experts", 8);
        var s = new Dictionary<string, long[]> { ["model.embed_tokens.weight"] = new long[] { v, h }, ["model.norm.weight"] = new long[] { h } };
        if (!B(c, "tie_word_embeddings", false)) s["lm_head.weight"] = new long[] { v, h };
        for (int i = 0; i < I(c, "num_hidden_layers"); i++)
        {
            string l = $"model.layers.{i}.";
            s[l + "self_attn.q_proj.weight"] = new long[] { heads * d, h };
            s[l + "self_attn.k_proj.weight"] = new long[] { kv * d, h };
            s[l + "self_attn.v_proj.weight"] = new long[] { kv * d, h };
            s[l + "self_attn.o_proj.weight"] = new long[] { h, heads * d };
            s[l + "block_sparse_moe.gate.weight"] = new long[] { experts, h };
            for (int e = 0; e < experts; e++)
            {
                s[l + $"block_sparse_moe.experts.{e}.w1.weight"] = new long[] { ff, h };
                s[l + $"block_sparse_moe.experts.{e}.w3.weight"] = new long[] { ff, h };
                s[l + $"block_sparse_moe.experts.{e}.w2.weight"] = new long[] { h, ff };
            }
            s[l + "input_layernorm.weight"] = new long[] { h };
            s[l + "post_attention_layernorm.weight"] = new long[] { h };
        }
        return s;
    }

    /// <summary>
    /// Qwen3MoeForCausalLM as the hub stores it: head_dim = getattr(config, "head_dim", hidden // heads), q/k/v/o biases per
    /// attention_bias, q_norm/k_norm [head_dim]; layer i has `mlp.gate` [num_experts, hidden] and experts of
    /// moe_intermediate_size if i ∉ mlp_only_layers, num_experts > 0 and (i + 1) % decoder_sparse_step == 0, else a dense
    /// `mlp` of intermediate_size.
    /// </summary>
    static Dictionary<string, long[]> Qwen3MoeShapes(JsonObject c)
    {
        int h = I(c, "hidden_size"), heads = I(c, "num_attention_heads"), kv = I(c, "num_key_value_heads", heads), v = I(c, "vocab_size");
        int d = I(c, "head_dim", h / heads), experts = I(c, "num_experts", 128), moe = I(c, "moe_intermediate_size", 768), dense = I(c, "intermediate_size", 6144);
        int step = I(c, "decoder_sparse_step", 1);
        var mlpOnly = c["mlp_only_layers"] is JsonArray a ? a.Select(x => (int)x!).ToHashSet() : new HashSet<int>();
        bool bias = B(c, "attention_bias", false);
        var s = new Dictionary<string, long[]> { ["model.embed_tokens.weight"] = new long[] { v, h }, ["model.norm.weight"] = new long[] { h } };
        if (!B(c, "tie_word_embeddings", false)) s["lm_head.weight"] = new long[] { v, h };
        for (int i = 0; i < I(c, "num_hidden_layers"); i++)
        {
            string l = $"model.layers.{i}.";
            foreach (var (n, rows, cols) in new[] { ("q_proj", (long)heads * d, (long)h), ("k_proj", (long)kv * d, h), ("v_proj", (long)kv * d, h), ("o_proj", h, (long)heads * d) })
            {
                s[l + $"self_attn.{n}.weight"] = new[] { rows, cols };
                if (bias) s[l + $"self_attn.{n}.bias"] = new[] { rows };
            }
            s[l + "self_attn.q_norm.weight"] = new long[] { d };
            s[l + "self_attn.k_norm.weight"] = new long[] { d };
            if (!mlpOnly.Contains(i) && experts > 0 && (i + 1) % step == 0)
            {
                s[l + "mlp.gate.weight"] = new long[] { experts, h };
                for (int e = 0; e < experts; e++)
                {
                    s[l + $"mlp.experts.{e}.gate_proj.weight"] = new long[] { moe, h };
                    s[l + $"mlp.experts.{e}.up_proj.weight"] = new long[] { moe, h };
                    s[l + $"mlp.experts.{e}.down_proj.weight"] = new long[] { h, moe };
                }
            }
            else
            {
                s[l + "mlp.gate_proj.weight"] = new long[] { dense, h };
                s[l + "mlp.up_proj.weight"] = new long[] { dense, h };
                s[l + "mlp.down_proj.weight"] = new long[] { h, dense };
            }
            s[l + "input_layernorm.weight"] = new long[] { h };
            s[l + "post_attention_layernorm.weight"] = new long[] { h };
        }
        return s;
    }

    /// <summary>Every stored tensor has the stock class's name and shape, none is extra, none missing.</summary>
    static void AssertStockShapes(string dir, Func<JsonObject, Dictionary<string, long[]>> derive)
    {
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        var want = derive(cfg);
        using var ck = new CheckpointReader(dir);
        var have = ck.Names.ToDictionary(n => n, n => ck.Entry(n).Shape);
        Assert.Empty(have.Keys.Except(want.Keys).OrderBy(x => x));
        Assert.Empty(want.Keys.Except(have.Keys).OrderBy(x => x));
        foreach (var (name, shape) in want)
            Assert.True(shape.SequenceEqual(have[name]), $"{dir}: {name} stored [{string.Join(", ", have[name])}], stock class builds [{string.Join(", ", shape)}]");
    }

    static JsonObject Report(string dir) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, PrunedCheckpoint.ReportFile)))!.AsObject();

    static JsonObject Config(string dir) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();

    static PruneJobOptions TextJob(string model, string outDir, PruneOptions prune, string calib, int len) => new()
    {
        ModelDir = model, OutDir = outDir, Prune = prune, CalibSource = calib, CalibSamples = 4, CalibSeqLen = len,
    };

    [Fact]
    public void Uniform_prunes_of_the_bundled_models_have_exactly_the_stock_shapes()
    {
        using var tmp = new TempDir();
        var ratio = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.25, UniformWidths = true };

        // OPT, MLP only: stock OPT expresses it through ffn_dim.
        PruneJob.Run(TextJob(Model("opt-tiny-c4-v2"), tmp.Sub("opt"), ratio with { Targets = new HashSet<NodeKind> { NodeKind.Mlp } }, TextSources.C4, 64), null);
        Assert.Equal(768, I(Config(tmp.Sub("opt")), "ffn_dim"));
        AssertStockShapes(tmp.Sub("opt"), OptShapes);
        Assert.True((bool)Report(tmp.Sub("opt"))["stock_loadable"]!);

        // ViT, heads and MLP: intermediate_size and pruned_heads.
        PruneJob.Run(new PruneJobOptions
        {
            ModelDir = Model("vit-tiny"), OutDir = tmp.Sub("vit"), Prune = ratio with { Amount = 0.34 },
            CalibSource = Path.Combine(Repo.Root, "eval", "data", "imagenet-val"), CalibSamples = 4,
        }, null);
        var vit = Config(tmp.Sub("vit"));
        Assert.Equal(768 - 261, I(vit, "intermediate_size"));
        Assert.All(Enumerable.Range(0, 12), l => Assert.Single(vit["pruned_heads"]![l.ToString()]!.AsArray()));
        AssertStockShapes(tmp.Sub("vit"), VitShapes);
        Assert.True((bool)Report(tmp.Sub("vit"))["stock_loadable"]!);

        // Llama (stories260K), K/V groups and MLP.
        PruneJob.Run(TextJob(Model("stories260k"), tmp.Sub("llama"), ratio, TextSources.TinyStories, 128), null);
        var llama = Config(tmp.Sub("llama"));
        Assert.Equal((129, 6, 3, 8), (I(llama, "intermediate_size"), I(llama, "num_attention_heads"), I(llama, "num_key_value_heads"), I(llama, "head_dim")));
        AssertStockShapes(tmp.Sub("llama"), LlamaShapes);
        Assert.True((bool)Report(tmp.Sub("llama"))["stock_loadable"]!);

        // LlmSnp still reads all three at their pruned size.
        foreach (var d in new[] { "opt", "vit", "llama" })
        {
            using var m = ModelFamilies.Open(tmp.Sub(d));
            Assert.Equal((long)Report(tmp.Sub(d))["params_after"]!, m.ParameterCount());
        }
    }

    /// <summary>
    /// Mixtures pruned with --uniform and --experts-keep: every stored tensor is what MixtralForCausalLM / Qwen3MoeForCausalLM
    /// build from the written config (experts renumbered 0..K−1, the router's rows with them); Qwen3-MoE's dense layer keeps
    /// intermediate_size stock for its own width. Per-expert widths (--variance) are not stock-loadable and say why.
    /// </summary>
    [Fact]
    public void Uniform_mixture_prunes_with_experts_removed_have_exactly_the_stock_shapes()
    {
        using var tmp = new TempDir();
        var ratio = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.25, UniformWidths = true };
        PruneJob.Run(TextJob(FixtureWithTokenizer(tmp, "golden-families/mixtral"), tmp.Sub("mixtral-out"), ratio with { Experts = new ExpertOptions { Keep = 3 } }, TextSources.TinyStories, 64), null);
        var mixtral = Config(tmp.Sub("mixtral-out"));
        Assert.Equal((3, 72, 4, 2), (I(mixtral, "num_local_experts"), I(mixtral, "intermediate_size"), I(mixtral, "num_attention_heads"), I(mixtral, "num_key_value_heads")));
        AssertStockShapes(tmp.Sub("mixtral-out"), MixtralShapes);
        Assert.True((bool)Report(tmp.Sub("mixtral-out"))["stock_loadable"]!);

        string qwenSrc = FixtureWithTokenizer(tmp, "golden-families/qwen3_moe");
        PruneJob.Run(TextJob(qwenSrc, tmp.Sub("qwen3_moe-out"), ratio with { Experts = new ExpertOptions { KeepFraction = 0.5 } }, TextSources.TinyStories, 64), null);
        var qwen = Config(tmp.Sub("qwen3_moe-out"));
        Assert.Equal((4, 36, 96), (I(qwen, "num_experts"), I(qwen, "moe_intermediate_size"), I(qwen, "intermediate_size")));
        AssertStockShapes(tmp.Sub("qwen3_moe-out"), Qwen3MoeShapes);
        Assert.True((bool)Report(tmp.Sub("qwen3_moe-out"))["stock_loadable"]!);

        PruneJob.Run(TextJob(qwenSrc, tmp.Sub("variance"), new PruneOptions { Policy = RatioPolicyKind.Variance, Amount = 0.9, Targets = new HashSet<NodeKind> { NodeKind.Expert } }, TextSources.TinyStories, 64), null);
        Assert.False((bool)Report(tmp.Sub("variance"))["stock_loadable"]!);
        Assert.Contains("expert widths differ", (string)Report(tmp.Sub("variance"))["stock_loadable_why_not"]!);
        foreach (var d in new[] { "mixtral-out", "qwen3_moe-out", "variance" })
        {
            using var m = ModelFamilies.Open(tmp.Sub(d));
            Assert.Equal((long)Report(tmp.Sub(d))["params_after"]!, m.ParameterCount());
        }
    }

    [Fact]
    public void Opt_with_heads_removed_says_it_is_not_stock_loadable_and_its_padded_copy_is()
    {
        using var tmp = new TempDir();
        string src = new TinyOpt().Write(tmp.Sub("src"));
        var calib = Enumerable.Range(0, 4).Select(i => torch.tensor(Enumerable.Range(0, 16).Select(t => (long)(3 + (t * 7 + i * 5) % 90)).ToArray(), new long[] { 1, 16 })).ToList();
        using var m = new OptModel(src, CPU, ScalarType.Float64);
        var report = PrunedCheckpoint.Write(new PrunedCheckpoint.Request
        {
            Model = m, Options = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.5, UniformWidths = true }, Calibration = calib,
            CalibrationInfo = new JsonObject(), OutDir = tmp.Sub("out"), SourceDir = src, ParamsBefore = m.ParameterCount(), ExportPadded = true,
        });
        Assert.False((bool)report["stock_loadable"]!);
        Assert.Contains("heads removed", (string)report["stock_loadable_why_not"]!);
        var cfg = Config(tmp.Sub("out"));
        Assert.Equal(32, I(cfg, "ffn_dim"));   // the MLP part is still stated the stock way
        AssertStockShapes(Path.Combine(tmp.Sub("out"), "padded"), OptShapes);
    }

    /// <summary>A copy of a LLaMA-family fixture with the stories260K tokenizer (same 512-token vocabulary).</summary>
    static string FixtureWithTokenizer(TempDir tmp, string fixture)
    {
        string dir = tmp.Sub(Path.GetFileName(fixture));
        Directory.CreateDirectory(dir);
        foreach (var f in new[] { "model.safetensors", "config.json" }) File.Copy(Path.Combine(Repo.Fixture(fixture), f), Path.Combine(dir, f));
        foreach (var f in new[] { "tokenizer.model", "tokenizer_config.json" }) File.Copy(Path.Combine(Model("stories260k"), f), Path.Combine(dir, f));
        return dir;
    }

    [Theory]
    [InlineData("golden-llama/qwen2-bias-tied", ReconstructMode.LstsqBias)]
    [InlineData("golden-llama/mistral-f16", ReconstructMode.Bias)]
    public void A_mean_term_the_stock_class_cannot_hold_falls_back_to_the_bias_free_reconstruction(string fixture, ReconstructMode mode)
    {
        using var tmp = new TempDir();
        string src = FixtureWithTokenizer(tmp, fixture);
        string type = (string)Config(src)["model_type"]!;
        PruneJob.Run(TextJob(src, tmp.Sub("out"), new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.5, Reconstruct = mode, UniformWidths = true }, TextSources.TinyStories, 64), null);
        var report = Report(tmp.Sub("out"));
        var layers = report["layers"]!.AsArray();
        Assert.NotEmpty(layers);
        foreach (var l in layers)
        {
            Assert.Equal("lstsq-nobias", (string)l!["reconstruct_used"]!);
            Assert.False((bool)l["reconstruct_constant"]!);
            string consumer = (string)l["kind"]! == "heads" ? "o_proj" : "down_proj";
            Assert.Equal($"stock {type} {consumer} has no bias", (string)l["bias_free_because"]!);
        }
        var cfg = Config(tmp.Sub("out"));
        Assert.False(B(cfg, "attention_bias", false) || B(cfg, "mlp_bias", false));
        AssertStockShapes(tmp.Sub("out"), LlamaShapes);
        Assert.True((bool)report["stock_loadable"]!);
        // The fallback is the bias-free fit: the same prune asked for lstsq-nobias writes the same weights.
        PruneJob.Run(TextJob(src, tmp.Sub("ref"), new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.5, Reconstruct = ReconstructMode.LstsqNoBias, UniformWidths = true }, TextSources.TinyStories, 64), null);
        Assert.Equal(File.ReadAllBytes(Path.Combine(tmp.Sub("ref"), "model.safetensors")), File.ReadAllBytes(Path.Combine(tmp.Sub("out"), "model.safetensors")));
        Assert.All(Report(tmp.Sub("ref"))["layers"]!.AsArray(), l => Assert.Null(l!["bias_free_because"]));
    }

    /// <summary>
    /// Budget with --uniform on stories260K: every layer keeps the same K/V groups and neurons, and the removal is the closest
    /// to the budget among all equal-width choices (enumerated here from parameter counts derived from the shapes).
    /// </summary>
    [Fact]
    public void Uniform_budget_keeps_equal_widths_and_the_removal_closest_to_the_budget()
    {
        using var tmp = new TempDir();
        const double budget = 0.3;
        var report = PruneJob.Run(TextJob(Model("stories260k"), tmp.Sub("out"), new PruneOptions { Policy = RatioPolicyKind.Budget, Amount = budget, UniformWidths = true }, TextSources.TinyStories, 128), null).Report;
        var cfg = Config(tmp.Sub("out"));
        var mlp = cfg["intermediate_sizes"]!.AsArray().Select(x => (int)x!).ToArray();
        var kv = cfg["num_key_value_heads_per_layer"]!.AsArray().Select(x => (int)x!).ToArray();
        Assert.Single(mlp.Distinct());
        Assert.Single(kv.Distinct());
        Assert.Equal((mlp[0], kv[0]), (I(cfg, "intermediate_size"), I(cfg, "num_key_value_heads")));
        AssertStockShapes(tmp.Sub("out"), LlamaShapes);
        // stories260K: 5 layers, hidden 64, head_dim 8, 4 K/V groups of 2 query heads, 172 neurons.
        const int layers = 5, h = 64, d = 8;
        long perGroup = 2 * d * h + d * h + d * h + h * 2 * d;   // q rows, k rows, v rows, o columns
        long perNeuron = 3 * h;                                   // gate row, up row, down column
        long prunable = layers * (4 * perGroup + 172 * perNeuron);
        Assert.Equal(prunable, (long)report["prunable_params"]!);
        double best = double.PositiveInfinity;
        for (int g = 1; g <= 4; g++)
            for (int n = 1; n <= 172; n++)
                best = Math.Min(best, Math.Abs(layers * ((4 - g) * perGroup + (172 - n) * perNeuron) - budget * prunable));
        long removed = (long)report["prunable_params_removed"]!;
        Assert.Equal(layers * ((4 - kv[0]) * perGroup + (172 - mlp[0]) * perNeuron), removed);
        Assert.True(Math.Abs(Math.Abs(removed - budget * prunable) - best) < 1e-6, $"removed {removed}, requested {budget * prunable}, closest possible distance {best}");
        Assert.Null(report["tau"]);
        Assert.True((bool)report["options"]!["uniform_widths"]!);
        Assert.Equal(kv[0], (int)report["uniform_kept_groups"]!["heads"]!);
        Assert.Equal(mlp[0], (int)report["uniform_kept_groups"]!["mlp"]!);
    }

    [Fact]
    public void Uniform_with_the_variance_policy_is_one_line()
    {
        var e = Assert.Throws<LlmSnpException>(() => new PruneOptions { Policy = RatioPolicyKind.Variance, Amount = 0.9, UniformWidths = true }.Validate());
        Assert.Contains("--uniform", e.Message);
        Assert.DoesNotContain("\n", e.Message);
    }

    [Fact]
    public void Logits_dump_equals_the_streamed_forward()
    {
        var ids = new long[] { 1, 403, 407, 261, 378 };
        var dump = LlmSnp.Evaluation.LogitsDump.Run(Model("stories260k"), ids, CPU, ScalarType.Float64);
        using var m = new LlamaModel(Model("stories260k"), CPU, ScalarType.Float64);
        using var want = m.Head(Enumerable.Range(0, m.BlockCount).Aggregate(m.Embed(torch.tensor(ids, new long[] { 1, 5 })), (h, i) => { using var b = m.LoadBlock(i); return b.Forward(h)!; })).squeeze(0);
        var got = dump["logits"]!.AsArray();
        Assert.Equal(5, got.Count);
        for (int t = 0; t < 5; t++)
            for (int v = 0; v < 512; v += 37) Assert.Equal(want[t, v].item<double>(), (double)got[t]![v]!, 12);
        var e = Assert.Throws<LlmSnpException>(() => LlmSnp.Evaluation.LogitsDump.Run(Model("stories260k"), null, CPU, ScalarType.Float32));
        Assert.Contains("--ids", e.Message);
    }

    /// <summary>
    /// The stock check itself (tools/reference/stock_load_check.py: prune, `from_pretrained` in float64, logits) on one case
    /// per family and the negative control, where python3 imports torch and transformers (PYTHONPATH, or
    /// LLMSNP_STOCK_PYTHONPATH prepended to it); skipped, with the reason, elsewhere (CI has neither).
    /// </summary>
    [StockTransformersFact]
    public void Uniform_prunes_load_in_stock_transformers_with_llmsnp_logits()
    {
        using var tmp = new TempDir();
        var psi = StockTransformersFactAttribute.Python("tools/reference/stock_load_check.py", "--out", tmp.Sub("out"), "--json", tmp.Sub("record.json"),
            "--cases", "opt-mlp,opt-heads-padded,vit,stories260k,qwen2,neg-opt-heads-unpadded");
        using var p = System.Diagnostics.Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        Assert.True(p.WaitForExit(900_000), "the stock check did not finish in 15 minutes");
        Assert.True(p.ExitCode == 0, $"exit {p.ExitCode}\n{stdout.Result}\n{stderr.Result}");
        var record = JsonNode.Parse(File.ReadAllText(tmp.Sub("record.json")))!;
        var cases = record["cases"]!.AsArray();
        Assert.Equal(6, cases.Count);
        Assert.All(cases, c => Assert.True((bool)c!["ok"]!, c.ToJsonString()));
        Assert.All(cases.Where(c => (string)c!["case"]! != "neg-opt-heads-unpadded"), c => Assert.True((double)c!["max_abs_diff"]! < 1e-5));
        Assert.StartsWith("does not load", stdout.Result.Split('\n').Single(l => l.Contains("neg-opt-heads-unpadded:")).Split(": ", 2)[1]);
    }
}

/// <summary>Skips, saying why, unless a python3 imports torch and transformers: $LLMSNP_STOCK_PYTHON, python3, /usr/bin/python3 (Debian's python3-torch).</summary>
public sealed class StockTransformersFactAttribute : FactAttribute
{
    static readonly Lazy<(string? Python, string Why)> Found = new(() =>
    {
        var tried = new List<string>();
        foreach (var py in new[] { Environment.GetEnvironmentVariable("LLMSNP_STOCK_PYTHON"), "python3", "/usr/bin/python3" }.Where(x => !string.IsNullOrEmpty(x)).Distinct())
        {
            try
            {
                using var p = System.Diagnostics.Process.Start(Psi(py!, "-c", "import torch, transformers"))!;
                string err = p.StandardError.ReadToEnd();
                p.StandardOutput.ReadToEnd();
                if (!p.WaitForExit(60_000)) { p.Kill(); tried.Add($"{py}: no answer in a minute"); continue; }
                if (p.ExitCode == 0) return (py, "");
                tried.Add($"{py}: {err.Trim().Split('\n').LastOrDefault()}");
            }
            catch (System.ComponentModel.Win32Exception e) { tried.Add($"{py}: {e.Message}"); }
        }
        return (null, "needs python3 with PyTorch and transformers (a transformers source tree can be put on LLMSNP_STOCK_PYTHONPATH): " + string.Join("; ", tried));
    });

    public StockTransformersFactAttribute()
    {
        if (Found.Value.Python == null) Skip = Found.Value.Why;
    }

    /// <summary>The python3 found, in the repository root, with LLMSNP_STOCK_PYTHONPATH before PYTHONPATH and the hub kept offline.</summary>
    public static System.Diagnostics.ProcessStartInfo Python(params string[] args) => Psi(Found.Value.Python!, args);

    static System.Diagnostics.ProcessStartInfo Psi(string python, params string[] args)
    {
        var psi = new System.Diagnostics.ProcessStartInfo(python) { WorkingDirectory = Repo.Root, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        string path = string.Join(':', new[] { Environment.GetEnvironmentVariable("LLMSNP_STOCK_PYTHONPATH"), Environment.GetEnvironmentVariable("PYTHONPATH") }
            .Where(x => !string.IsNullOrEmpty(x)));
        if (path.Length > 0) psi.Environment["PYTHONPATH"] = path;
        psi.Environment["HF_HUB_OFFLINE"] = "1";
        psi.Environment["TRANSFORMERS_OFFLINE"] = "1";
        return psi;
    }
}
