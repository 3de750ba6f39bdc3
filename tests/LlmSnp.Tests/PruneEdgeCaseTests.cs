using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Models;
using static TorchSharp.torch;
using Xunit.Abstractions;
using static LlmSnp.Tests.CliRuns;

namespace LlmSnp.Tests;

/// <summary>
/// `prune` at the edges of the math, as a user runs it (child process): a rank-deficient layer without damping, a ratio
/// that leaves one unit per layer, and two runs that must give byte-identical weights and the same report.
/// </summary>
[Collection("Console")]
public sealed class PruneEdgeCaseTests : IDisposable
{
    readonly ITestOutputHelper _out;
    readonly TempDir _tmp = new();
    public PruneEdgeCaseTests(ITestOutputHelper o) { _out = o; }
    public void Dispose() => _tmp.Dispose();

    static void AssertAllFinite(string dir)
    {
        using var r = new CheckpointReader(dir);
        foreach (var name in r.Names)
        {
            using var t = r.Read(name, ScalarType.Float64, CPU);
            Assert.True(torch.isfinite(t).all().item<bool>(), $"{name}: non-finite values in the written checkpoint");
        }
    }

    [Fact]
    public void Prune_of_a_rank_deficient_layer_without_damping_escalates_and_reports_it()
    {
        string model = (SmallOpt with
        {
            Edit = t =>
            {
                // Half of layer 0's neurons are exact copies of neuron 0: its Gram is singular.
                var w = t["model.decoder.layers.0.fc1.weight"];
                var b = t["model.decoder.layers.0.fc1.bias"];
                for (int r = 1; r < 32; r++) { w[r].copy_(w[0]); b[r].copy_(b[0]); }
            },
        }).Write(_tmp.Sub("model"));
        string outDir = _tmp.Sub("out");
        Succeeds(Run(PruneArgs(model, outDir, "--ratio", "0.25", "--damp", "0", "--targets", "mlp")));
        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "pruning_config.json")))!;
        var layer0 = report["layers"]!.AsArray().Single(l => l!["name"]!.GetValue<string>() == "layers.0.fc1")!;
        _out.WriteLine(layer0.ToJsonString());
        Assert.True(layer0["damping_escalations"]!.GetValue<int>() > 0, layer0.ToJsonString());
        Assert.True(layer0["damping_lambda"]!.GetValue<double>() > 0, layer0.ToJsonString());
        Assert.Equal(0.0, report["options"]!["damp"]!.GetValue<double>());
        AssertAllFinite(outDir);
    }

    [Fact]
    public void Prune_at_ratio_099_keeps_one_neuron_and_one_head_per_layer()
    {
        string model = (SmallOpt with { Ffn = 16 }).Write(_tmp.Sub("model"));
        string outDir = _tmp.Sub("out");
        Succeeds(Run(PruneArgs(model, outDir, "--ratio", "0.99")));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "config.json")))!;
        var ffn = cfg["ffn_dims"]!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
        var heads = cfg["num_heads_per_layer"]!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
        _out.WriteLine($"ffn_dims [{string.Join(", ", ffn)}], num_heads_per_layer [{string.Join(", ", heads)}]");
        Assert.Equal(2, ffn.Length);
        Assert.Equal(2, heads.Length);
        Assert.All(ffn, f => Assert.True(f >= 1));
        Assert.All(heads, h => Assert.True(h >= 1));
        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "pruning_config.json")))!;
        Assert.All(report["layers"]!.AsArray(), l => Assert.True(l!["groups_kept"]!.GetValue<int>() >= 1, l.ToJsonString()));
        AssertAllFinite(outDir);
        using var m = new OptModel(outDir);
        Assert.Equal(ffn, m.Config.FfnDims);
        Assert.Equal(heads, m.Config.HeadsPerLayer);
        using var logits = m.ForwardAllInMemory(torch.arange(8, ScalarType.Int64).unsqueeze(0));
        Assert.True(torch.isfinite(logits).all().item<bool>());
    }

    [Fact]
    public void Prune_twice_gives_byte_identical_weights_and_the_same_report()
    {
        string model = SmallOpt.Write(_tmp.Sub("model"));
        string a = _tmp.Sub("a"), b = _tmp.Sub("b");
        Succeeds(Run(PruneArgs(model, a, "--variance", "0.95")));
        Succeeds(Run(PruneArgs(model, b, "--variance", "0.95")));
        Assert.True(File.ReadAllBytes(Path.Combine(a, "model.safetensors")).AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(b, "model.safetensors"))),
            "model.safetensors differs between two identical runs");
        Assert.Equal(File.ReadAllText(Path.Combine(a, "config.json")), File.ReadAllText(Path.Combine(b, "config.json")));
        var ra = JsonNode.Parse(File.ReadAllText(Path.Combine(a, "pruning_config.json")))!.AsObject();
        var rb = JsonNode.Parse(File.ReadAllText(Path.Combine(b, "pruning_config.json")))!.AsObject();
        Assert.True(ra.Remove("seconds") && rb.Remove("seconds"));
        Assert.True(JsonNode.DeepEquals(ra, rb), $"reports differ beyond \"seconds\":\n{ra.ToJsonString()}\n{rb.ToJsonString()}");
        Assert.Equal(Directory.GetFiles(a).Select(Path.GetFileName).Order(), Directory.GetFiles(b).Select(Path.GetFileName).Order());
    }
}
