using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// Bad Qwen3 and Gemma checkpoints: each config field the forward refuses, the multimodal Gemma 3, misshapen or missing
/// q/k norms, per-layer lists that disagree with the stock field — one line naming the file and the field or tensor,
/// through the library and through the CLI (exit 1, nothing written).
/// </summary>
public class FamilyBadInputTests
{
    static void OpenAll(string dir)
    {
        using var m = ModelFamilies.OpenLanguageModel(dir);
        for (int i = 0; i < m.BlockCount; i++) using (var b = m.LoadBlock(i)) { }
    }

    static void OneLine(string dir, string named)
    {
        var e = Assert.Throws<LlmSnpException>(() => OpenAll(dir));
        Assert.Contains(named, e.Message);
        Assert.DoesNotContain("\n", e.Message);
    }

    [Theory]
    [InlineData("qwen3", "hidden_act", "\"gelu\"", "hidden_act")]
    [InlineData("qwen3", "rope_parameters", "{\"rope_type\": \"default\", \"rope_theta\": 1000000.0}", "rope_parameters")]
    [InlineData("qwen3", "rope_scaling", "{\"rope_type\": \"mystery\", \"factor\": 2.0}", "rope_scaling")]
    [InlineData("qwen3", "num_key_value_heads", "3", "num_key_value_heads")]
    [InlineData("qwen3", "head_dim", "23", "head_dim")]
    [InlineData("qwen3", "head_dim", "16", "self_attn.q_proj.weight")]
    [InlineData("qwen3", "layer_types", "[\"full_attention\"]", "layer_types")]
    [InlineData("qwen3", "intermediate_sizes", "[80, 80, 80]", "intermediate_size")]
    [InlineData("gemma2", "hidden_activation", "\"relu\"", "hidden_activation")]
    [InlineData("gemma2", "query_pre_attn_scalar", "0", "query_pre_attn_scalar")]
    [InlineData("gemma2", "attn_logit_softcapping", "-3", "attn_logit_softcapping")]
    [InlineData("gemma2", "sliding_window", "0", "sliding_window")]
    [InlineData("gemma2", "layer_types", "[\"sliding_attention\", \"global\", \"full_attention\"]", "layer_types")]
    [InlineData("gemma2", "num_heads_per_layer", "[4, 3, 4]", "num_heads_per_layer")]
    [InlineData("gemma3_text", "use_bidirectional_attention", "true", "use_bidirectional_attention")]
    [InlineData("gemma3_text", "rope_local_base_freq", "-1", "rope_local_base_freq")]
    [InlineData("gemma3_text", "rope_parameters", "{\"full_attention\": {\"rope_type\": \"default\"}}", "rope_parameters")]
    public void A_bad_config_field_is_one_line_naming_it(string fixture, string field, string value, string named)
    {
        using var tmp = new TempDir();
        OneLine(FamilyGoldenTests.WithConfig(tmp, fixture, c => c[field] = JsonNode.Parse(value)), named);
    }

    /// <summary>Without layer_types, Gemma 3's layers follow sliding_window_pattern, which must be a positive integer.</summary>
    [Fact]
    public void A_bad_sliding_window_pattern_is_one_line_naming_it()
    {
        using var tmp = new TempDir();
        OneLine(FamilyGoldenTests.WithConfig(tmp, "gemma3_text", c => { c.Remove("layer_types"); c["sliding_window_pattern"] = 0; }), "sliding_window_pattern");
    }

    /// <summary>Misshapen and missing q/k norms, and a Gemma 3 checkpoint without them.</summary>
    [Theory]
    [InlineData("qwen3", "model.layers.1.self_attn.q_norm.weight", 25)]
    [InlineData("qwen3", "model.layers.2.self_attn.k_norm.weight", 0)]
    [InlineData("gemma3_text", "model.layers.0.self_attn.k_norm.weight", 64)]
    [InlineData("gemma3_text", "model.layers.2.self_attn.q_norm.weight", 0)]
    [InlineData("gemma2", "model.layers.1.post_feedforward_layernorm.weight", 0)]
    public void A_misshapen_or_missing_norm_is_one_line_naming_the_tensor(string fixture, string tensor, int size)
    {
        using var tmp = new TempDir();
        string dir = FamilyGoldenTests.WithConfig(tmp, fixture, c => { });
        using (var r = new CheckpointReader(dir))
        {
            var all = r.Names.Where(n => n != tensor).Select(n => (n, r.Read(n, ScalarType.Float32, CPU))).ToList();
            if (size > 0) all.Add((tensor, torch.ones(size)));
            r.Dispose();
            SafeTensorsWriter.WriteAll(dir, all);
        }
        OneLine(dir, tensor);
    }

    [Fact]
    public void Gemma3_with_the_q_k_norms_of_gemma2_layout_missing_is_refused_and_gemma2_with_them_warns()
    {
        using var tmp = new TempDir();
        // A gemma3_text config over Gemma 2's tensors: the q/k norms it needs are missing.
        string g3 = FamilyGoldenTests.WithConfig(tmp, "gemma2", c => c["model_type"] = "gemma3_text", "g3");
        OneLine(g3, "q_norm");
        // A gemma2 config over Gemma 3's tensors: its q/k norms are unused (a warning, as HF ignores them too).
        string g2 = FamilyGoldenTests.WithConfig(tmp, "gemma3_text", c => { c["model_type"] = "gemma2"; c["layer_types"] = new JsonArray("sliding_attention", "full_attention", "sliding_attention"); }, "g2");
        using var m = ModelFamilies.OpenLanguageModel(g2);
        Assert.Equal(6, m.UnusedTensors.Count);
        Assert.All(m.UnusedTensors, n => Assert.Matches(@"self_attn\.[qk]_norm", n));
    }

    static string Multimodal(TempDir tmp)
    {
        string dir = tmp.Sub("gemma3-mm");
        Directory.CreateDirectory(dir);
        var text = JsonNode.Parse(File.ReadAllText(Path.Combine(FamilyGoldenTests.Fixture("gemma3_text"), "config.json")))!;
        File.WriteAllText(Path.Combine(dir, "config.json"), new JsonObject
        {
            ["architectures"] = new JsonArray("Gemma3ForConditionalGeneration"), ["model_type"] = "gemma3",
            ["text_config"] = text.DeepClone(), ["vision_config"] = new JsonObject { ["model_type"] = "siglip_vision_model" },
        }.ToJsonString());
        File.Copy(Path.Combine(FamilyGoldenTests.Fixture("gemma3_text"), "model.safetensors"), Path.Combine(dir, "model.safetensors"));
        return dir;
    }

    [Fact]
    public void The_multimodal_gemma3_is_one_line_in_the_library_and_the_cli()
    {
        using var tmp = new TempDir();
        string dir = Multimodal(tmp);
        OneLine(dir, "multimodal");
        string before = File.ReadAllText(Path.Combine(dir, "config.json"));
        var r = CliHarness.Run(new[] { "prune", "--model", dir, "--out", tmp.Sub("out"), "--ratio", "0.3", "--calib", "tinystories" });
        CliHarness.FailsWithOneLine(r, onlyLine: true, 1, "gemma3_text", Path.Combine(dir, "config.json"));
        Assert.False(Directory.Exists(tmp.Sub("out")));
        Assert.Equal(before, File.ReadAllText(Path.Combine(dir, "config.json")));
        var g = CliHarness.Run(new[] { "export", "gguf", "--model", dir, "--out", tmp.Sub("m.gguf") });
        CliHarness.FailsWithOneLine(g, onlyLine: true, 1, "multimodal");
        Assert.False(File.Exists(tmp.Sub("m.gguf")));
    }

    [Fact]
    public void The_cli_names_a_bad_field_of_a_qwen3_checkpoint_in_one_line()
    {
        using var tmp = new TempDir();
        string dir = FamilyGoldenTests.WithConfig(tmp, "qwen3", c => c["hidden_act"] = "relu");
        var r = CliHarness.Run(new[] { "inspect", "--model", dir });
        CliHarness.FailsWithOneLine(r, onlyLine: true, 1, "hidden_act", "config.json");
    }
}
