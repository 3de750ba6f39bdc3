using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

public class VitTests
{
    static string VitTiny => Path.Combine(Repo.Root, "models", "vit-tiny");

    static Tensor GoldenInput(string name)
    {
        if (name == "zeros") return torch.zeros(1, 3, 224, 224);
        var c = torch.arange(3, dtype: ScalarType.Float64).reshape(3, 1, 1);
        var h = torch.arange(224, dtype: ScalarType.Float64).reshape(1, 224, 1);
        var w = torch.arange(224, dtype: ScalarType.Float64).reshape(1, 1, 224);
        return torch.sin(0.05 * w + 0.07 * h + 1.3 * c).unsqueeze(0).to(ScalarType.Float32);
    }

    static double[] GoldenLogits(string name)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Repo.Fixture("vit-tiny-golden.json")));
        return doc.RootElement.GetProperty(name).GetProperty("logits").EnumerateArray().Select(x => x.GetDouble()).ToArray();
    }

    /// <summary>Rewrites an HF ViT checkpoint in timm layout (fused qkv, timm names).</summary>
    static void WriteTimmCopy(string hfDir, string outDir, int layers)
    {
        using var r = new CheckpointReader(hfDir);
        var t = r.Names.ToDictionary(n => n, n => r.Read(n, ScalarType.Float32, CPU));
        var o = new Dictionary<string, Tensor>
        {
            ["cls_token"] = t["vit.embeddings.cls_token"], ["pos_embed"] = t["vit.embeddings.position_embeddings"],
            ["patch_embed.proj.weight"] = t["vit.embeddings.patch_embeddings.projection.weight"],
            ["patch_embed.proj.bias"] = t["vit.embeddings.patch_embeddings.projection.bias"],
            ["norm.weight"] = t["vit.layernorm.weight"], ["norm.bias"] = t["vit.layernorm.bias"],
            ["head.weight"] = t["classifier.weight"], ["head.bias"] = t["classifier.bias"],
        };
        for (int i = 0; i < layers; i++)
        {
            string p = $"vit.encoder.layer.{i}.", q = $"blocks.{i}.";
            foreach (var (a, b) in new[] { ("layernorm_before", "norm1"), ("attention.output.dense", "attn.proj"), ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2") })
                foreach (var s in new[] { ".weight", ".bias" }) o[q + b + s] = t[p + a + s];
            foreach (var s in new[] { ".weight", ".bias" })
                o[q + "attn.qkv" + s] = torch.cat(new[] { t[p + "attention.attention.query" + s], t[p + "attention.attention.key" + s], t[p + "attention.attention.value" + s] }, 0);
        }
        SafeTensorsWriter.WriteAll(outDir, o.Select(kv => (kv.Key, kv.Value)));
        File.Copy(Path.Combine(hfDir, "config.json"), Path.Combine(outDir, "config.json"));
    }

    [Fact]
    public void Forward_matches_the_float64_reference_from_hf_and_timm_layouts()
    {
        using var tmp = new TempDir();
        WriteTimmCopy(VitTiny, tmp.Sub("timm"), 12);
        using var hf = new VitModel(VitTiny);
        using var timm = new VitModel(tmp.Sub("timm"));
        Assert.True(timm.Timm);
        foreach (var name in new[] { "zeros", "pattern" })
        {
            using var x = GoldenInput(name);
            using var want = torch.tensor(GoldenLogits(name), ScalarType.Float64);
            using var a = hf.ForwardAllInMemory(x).squeeze(0).to(ScalarType.Float64);
            using var b = timm.ForwardAllInMemory(x).squeeze(0).to(ScalarType.Float64);
            double err = (a - want).abs().max().item<double>();
            Assert.True(err < 1e-3, $"{name}: max |Δlogit| {err:G3}");
            Assert.Equal(0.0, (a - b).abs().max().item<double>());
        }
    }

    [Fact]
    public void Distilled_deit_averages_its_class_and_distillation_heads()
    {
        using var tmp = new TempDir();
        string dir = new TinyVit { Distilled = true }.Write(tmp.Sub("deit"));
        using var m = new VitModel(dir, CPU, ScalarType.Float64);
        Assert.True(m.Distilled);
        using var x = torch.randn(2, 3, 32, 32, dtype: ScalarType.Float64);
        using var logits = m.ForwardAllInMemory(x);
        // Independent: run the blocks, then both heads by hand.
        var h = m.Embed(x);
        for (int i = 0; i < m.BlockCount; i++) using (var b = m.LoadBlock(i)) h = b.Forward(h)!;
        using var r = new CheckpointReader(dir);
        Tensor W(string n) => r.Read(n, ScalarType.Float64, CPU);
        var normed = nn.functional.layer_norm(h, new long[] { 32 }, W("deit.layernorm.weight"), W("deit.layernorm.bias"), 1e-12);
        var cls = nn.functional.linear(normed.select(1, 0), W("cls_classifier.weight"), W("cls_classifier.bias"));
        var dist = nn.functional.linear(normed.select(1, 1), W("distillation_classifier.weight"), W("distillation_classifier.bias"));
        Assert.True(((cls + dist) / 2 - logits).abs().max().item<double>() < 1e-12);
        Assert.True((cls - logits).abs().max().item<double>() > 1e-6);
    }

    [Fact]
    public void Pruned_vit_reloads_and_its_padded_export_gives_the_same_logits()
    {
        using var tmp = new TempDir();
        string src = new TinyVit().Write(tmp.Sub("vit"));
        var calib = Enumerable.Range(0, 3).Select(i => torch.randn(new long[] { 4, 3, 32, 32 }, generator: new torch.Generator((ulong)(10 + i)))).ToList();
        using var probe = torch.randn(new long[] { 2, 3, 32, 32 }, generator: new torch.Generator(99));
        var opt = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.5, Ordering = Ordering.Zca };
        Tensor inMemory;
        using (var model = new VitModel(src, CPU, ScalarType.Float64))
        {
            var h = model.Embed(probe);
            new SnpEngine(model, opt).Run(calib, (block, _) => h = block.Forward(h)!);
            inMemory = model.Head(h);
        }
        using (var model = new VitModel(src, CPU, ScalarType.Float64))
            PrunedCheckpoint.Write(new PrunedCheckpoint.Request
            {
                Model = model, Options = opt, Calibration = calib, CalibrationInfo = new JsonObject(), OutDir = tmp.Sub("out"),
                SourceDir = src, ParamsBefore = model.ParameterCount(), ExportPadded = true,
            });
        foreach (var dir in new[] { tmp.Sub("out"), Path.Combine(tmp.Sub("out"), "padded") })
        {
            using var m = new VitModel(dir, CPU, ScalarType.Float64);
            using var l = m.ForwardAllInMemory(probe);
            Assert.True(((l - inMemory).norm() / inMemory.norm()).item<double>() < 1e-6, dir);
        }
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Sub("out"), "config.json")))!;
        Assert.Equal(2, cfg["num_heads_per_layer"]![0]!.GetValue<int>());
        Assert.Equal(32, cfg["intermediate_sizes"]![0]!.GetValue<int>());
        Assert.Equal(2, cfg["pruned_heads"]!["0"]!.AsArray().Count);
        // A stock-style config (pruned_heads only, as transformers writes it) also loads.
        cfg.AsObject().Remove("num_heads_per_layer");
        File.WriteAllText(Path.Combine(tmp.Sub("out"), "config.json"), cfg.ToJsonString());
        using var stock = new VitModel(tmp.Sub("out"), CPU, ScalarType.Float64);
        Assert.Equal(2, stock.Config.HeadsPerLayer[1]);
    }

    [Fact]
    public void Unsupported_vit_configs_are_rejected_with_the_field_named()
    {
        using var tmp = new TempDir();
        string dir = new TinyVit().Write(tmp.Sub("vit"));
        var path = Path.Combine(dir, "config.json");
        var cfg = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        cfg["patch_size"] = new JsonArray(8, 4);
        File.WriteAllText(path, cfg.ToJsonString());
        var e = Assert.Throws<LlmSnpException>(() => new VitModel(dir));
        Assert.Contains("patch_size", e.Message);
        Assert.Contains("config.json", e.Message);
    }
}
