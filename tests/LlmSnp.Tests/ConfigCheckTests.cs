using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>A checkpoint is checked against its config when it is opened: by inspect as by eval and prune.</summary>
public class ConfigCheckTests
{
    /// <summary>Rewrites a tiny OPT's tensors (drop, reshape, add) and returns its directory.</summary>
    static string Edited(TempDir tmp, Action<Dictionary<string, Tensor>> edit, int layers = 2) =>
        new TinyOpt { Layers = layers, Edit = edit }.Write(tmp.Sub("m"));

    [Fact]
    public void Inspect_fails_on_a_missing_tensor_or_a_wrong_shape_naming_it()
    {
        using var tmp = new TempDir();
        string missing = new TinyOpt { Edit = t => t.Remove("model.decoder.layers.1.fc2.bias") }.Write(tmp.Sub("a"));
        CliHarness.FailsWithOneLine(CliHarness.Run(new[] { "inspect", "--model", missing }), onlyLine: true, mentions: "layers.1.fc2.bias");
        string shape = new TinyOpt { Edit = t => t["model.decoder.layers.0.fc1.bias"] = torch.zeros(7) }.Write(tmp.Sub("b"));
        CliHarness.FailsWithOneLine(CliHarness.Run(new[] { "inspect", "--model", shape }), onlyLine: true, mentions: "layers.0.fc1.bias");
    }

    [Fact]
    public void Fewer_layers_in_the_config_than_in_the_file_is_an_error()
    {
        using var tmp = new TempDir();
        string dir = new TinyOpt { Layers = 3 }.Write(tmp.Sub("m"));
        var cfgPath = Path.Combine(dir, "config.json");
        var cfg = JsonNode.Parse(File.ReadAllText(cfgPath))!.AsObject();
        cfg["num_hidden_layers"] = 2;
        File.WriteAllText(cfgPath, cfg.ToJsonString());
        CliHarness.FailsWithOneLine(CliHarness.Run(new[] { "inspect", "--model", dir }), onlyLine: true, mentions: new[] { "num_hidden_layers", "layer 2" });
        // The LLaMA family likewise.
        string llama = Path.Combine(tmp.Path, "llama");
        Directory.CreateDirectory(llama);
        string src = Path.Combine(Repo.Root, "models", "stories260k");
        foreach (var f in new[] { "model.safetensors", "tokenizer.model" }) File.Copy(Path.Combine(src, f), Path.Combine(llama, f));
        var lc = JsonNode.Parse(File.ReadAllText(Path.Combine(src, "config.json")))!.AsObject();
        lc["num_hidden_layers"] = 4;
        File.WriteAllText(Path.Combine(llama, "config.json"), lc.ToJsonString());
        CliHarness.FailsWithOneLine(CliHarness.Run(new[] { "inspect", "--model", llama }), onlyLine: true, mentions: new[] { "num_hidden_layers", "layer 4" });
    }

    [Fact]
    public void Unused_tensors_are_one_warning_and_listed_by_inspect()
    {
        using var tmp = new TempDir();
        string dir = new TinyOpt { Edit = t => t["model.decoder.extra_adapter.weight"] = torch.zeros(4, 4) }.Write(tmp.Sub("m"));
        var r = CliHarness.Run(new[] { "inspect", "--model", dir });
        var json = JsonNode.Parse(CliHarness.Succeeds(r))!;
        Assert.Equal("model.decoder.extra_adapter.weight", (string)json["unused_tensors"]![0]!);
        var warnings = r.StderrLines.Where(l => l.StartsWith("warning: ")).ToArray();
        Assert.Single(warnings);
        Assert.Contains("extra_adapter.weight", warnings[0]);
        // A clean checkpoint warns about nothing.
        string clean = new TinyOpt().Write(tmp.Sub("c"));
        var rc = CliHarness.Run(new[] { "inspect", "--model", clean });
        CliHarness.Succeeds(rc);
        Assert.DoesNotContain(rc.StderrLines, l => l.StartsWith("warning: "));
    }
}
