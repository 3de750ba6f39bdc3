using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Pruning;
using LlmSnp.Reporting;

namespace LlmSnp.Tests;

/// <summary>
/// `compare`: each row's perplexity equals what `prune --eval` measures on the written checkpoint (an independent path:
/// checkpoint written, reloaded, evaluated), each pruned model is timed against dense, and MLP widths can be aligned.
/// </summary>
public class CompareTests
{
    static string Stories => Path.Combine(Repo.Root, "models", "stories260k");

    static CompareOptions Options(string outDir) => new()
    {
        ModelDir = Stories, OutDir = outDir, Methods = new[] { Method.Parse("zca"), Method.Parse("magnitude") }, Ratios = new[] { 0.3 },
        TargetSets = new[] { "mlp,heads" }, Calib = TextSources.TinyStories, CalibSamples = 8, CalibSeqLen = 128,
        Eval = TextSources.TinyStories, EvalSeqLen = 128, EvalLimit = 8, WidthMultiple = 16,
    };

    [Fact]
    public void Rows_equal_prune_of_the_same_options_and_each_pruned_model_is_timed()
    {
        using var tmp = new TempDir();
        int leftBefore = Directory.GetDirectories(Path.GetTempPath(), "llmsnp-compare-*").Length;
        var json = CompareJob.Run(Options(tmp.Sub("cmp")), null);
        var rows = json["rows"]!.AsArray();
        Assert.Equal(2, rows.Count);
        Assert.Equal(leftBefore, Directory.GetDirectories(Path.GetTempPath(), "llmsnp-compare-*").Length);   // the timed copies are removed
        Assert.NotNull(json["dense_speed"]?["llmsnp"]);
        Assert.NotNull(json["dense_speed"]?["llama_cpp"]);

        var prune = PruneJob.Run(new PruneJobOptions
        {
            ModelDir = Stories, OutDir = tmp.Sub("zca"),
            Prune = new PruneOptions { Ordering = Ordering.Zca, Policy = RatioPolicyKind.Ratio, Amount = 0.3, WidthMultiple = 16 },
            CalibSource = TextSources.TinyStories, CalibSamples = 8, CalibSeqLen = 128,
            EvalDataset = TextSources.TinyStories, EvalSeqLen = 128, EvalLimit = 8, MeasureSpeed = false,
        }, null);
        var zca = rows[0]!;
        Assert.Equal(prune.Eval!.Pruned, (double)zca["metric"]!, 6);
        Assert.Equal(prune.ParamsAfter, (long)zca["params_after"]!);
        Assert.Equal(16, (int)prune.Report["options"]!["width_multiple"]!);
        // 172 neurons less 30 % is 120; the nearest multiple of 16 (ties up) is 128.
        Assert.All(prune.Report["layers"]!.AsArray().Where(l => (string)l!["kind"]! == "mlp"), l => Assert.Equal(128, (int)l!["units_kept"]!));

        foreach (var r in rows)
        {
            double frac = (double)r!["fraction_removed"]!;
            Assert.Equal(1 / (1 - frac), (double)r["flop_ratio"]!, 9);   // weight FLOPs scale with the prunable parameters kept
            Assert.True((double)r["prefill_speedup"]! > 0 && (double)r["decode_speedup"]! > 0);
            Assert.True((double)r["llama_cpp_prefill_speedup"]! > 0 && (double)r["llama_cpp_decode_speedup"]! > 0);
        }
        var csv = File.ReadAllLines(Path.Combine(tmp.Sub("cmp"), "comparison.csv"));
        Assert.EndsWith("flop_ratio,prefill_speedup,decode_speedup,llama_cpp_prefill_speedup,llama_cpp_decode_speedup", csv[0]);
        Assert.All(csv.Skip(2), line => Assert.DoesNotContain(",,", line));
    }

    [Fact]
    public void No_speed_leaves_the_speed_columns_empty_and_a_zero_multiple_is_refused()
    {
        using var tmp = new TempDir();
        string[] common = { "compare", "--model", Stories, "--methods", "magnitude", "--ratios", "0.2", "--targets", "mlp",
            "--calib", "tinystories", "--calib-samples", "4", "--calib-seqlen", "64", "--eval", "tinystories", "--eval-seqlen", "64", "--eval-limit", "4" };
        CliHarness.Succeeds(CliHarness.Run([.. common, "--out", tmp.Sub("a"), "--no-speed"]));
        var json = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Sub("a"), "comparison.json")))!;
        Assert.Null(json["dense_speed"]);
        Assert.Null(json["rows"]![0]!["prefill_speedup"]);
        Assert.EndsWith(",,,,,", File.ReadAllLines(Path.Combine(tmp.Sub("a"), "comparison.csv"))[2]);

        var bad = CliHarness.Run([.. common, "--out", tmp.Sub("b"), "--width-multiple", "0"]);
        Assert.Equal(1, bad.ExitCode);
        Assert.Single(bad.StderrLines);
        Assert.Contains("--width-multiple", bad.Stderr);
        Assert.False(Directory.Exists(tmp.Sub("b")));
    }

    [Theory]
    [InlineData(120, 172, 16, 128)]   // 7.5 multiples: ties go up
    [InlineData(119, 172, 16, 112)]
    [InlineData(3, 172, 16, 16)]      // at least one multiple
    [InlineData(172, 172, 16, 172)]   // a layer the policy keeps whole stays whole
    [InlineData(170, 172, 16, 172)]   // and so does one whose nearest multiple passes its width
    [InlineData(10, 12, 16, 12)]
    [InlineData(8806, 11008, 16, 8800)]
    [InlineData(57, 100, 1, 57)]
    public void Kept_widths_round_to_the_nearest_multiple(int keep, int units, int multiple, int want) =>
        Assert.Equal(want, RatioPolicy.RoundToMultiple(keep, units, multiple));
}
