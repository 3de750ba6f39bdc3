using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LlmSnp.Data;
using LlmSnp.Evaluation;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// The model card `prune` writes (OUT/README.md): its front matter read back by a small YAML reader written here,
/// every field against the run's report (pruning_config.json) and the source's own card and config.
/// </summary>
public class ModelCardTests
{
    /// <summary>
    /// The front matter as YAML reads it, for the flat subset a hub card uses: `key: scalar` (plain, or double-quoted
    /// with JSON-style escapes) and `key:` followed by `- item` lines. Anything else in it fails the test.
    /// </summary>
    static (Dictionary<string, List<string>> Front, string Body) ReadCard(string dir)
    {
        string text = File.ReadAllText(Path.Combine(dir, "README.md"));
        Assert.StartsWith("---\n", text);
        int end = text.IndexOf("\n---\n", 3, StringComparison.Ordinal);
        Assert.True(end > 0, "front matter not closed");
        var front = new Dictionary<string, List<string>>();
        string? listKey = null;
        foreach (var line in text[4..end].Split('\n'))
        {
            if (line.StartsWith("- "))
            {
                Assert.True(listKey != null, $"list item outside a list: '{line}'");
                front[listKey!].Add(Scalar(line[2..]));
                continue;
            }
            var m = Regex.Match(line, @"^([a-z_]+):(?: (.+))?$");
            Assert.True(m.Success, $"not a YAML key line: '{line}'");
            string key = m.Groups[1].Value;
            Assert.False(front.ContainsKey(key), $"key {key} twice");
            front[key] = m.Groups[2].Success ? new List<string> { Scalar(m.Groups[2].Value) } : new List<string>();
            listKey = m.Groups[2].Success ? null : key;
        }
        return (front, text[(end + 5)..]);
    }

    static string Scalar(string v)
    {
        if (v.StartsWith('"')) return JsonSerializer.Deserialize<string>(v)!;
        Assert.Matches(@"^[A-Za-z0-9_][A-Za-z0-9_./+-]*$", v);   // a plain scalar YAML reads as this same string
        Assert.DoesNotMatch(@"^(true|false|null|yes|no|[0-9.]+)$", v);
        return v;
    }

    static JsonObject Report(string dir) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, PrunedCheckpoint.ReportFile)))!.AsObject();

    /// <summary>The widths table: block → (column header → cell), blocks expanded from "a–b" ranges.</summary>
    static Dictionary<int, Dictionary<string, string>> WidthRows(string body)
    {
        var lines = body.Split('\n').SkipWhile(l => l != "## Widths per layer").Skip(2).TakeWhile(l => l.StartsWith('|')).ToList();
        var header = lines[0].Trim('|').Split('|').Select(c => c.Trim()).ToArray();
        var rows = new Dictionary<int, Dictionary<string, string>>();
        foreach (var line in lines.Skip(2))
        {
            var cells = line.Trim('|').Split('|').Select(c => c.Trim()).ToArray();
            var range = cells[0].Split('–').Select(int.Parse).ToArray();
            for (int b = range[0]; b <= range[^1]; b++)
                rows.Add(b, header.Skip(1).Zip(cells.Skip(1)).ToDictionary(z => z.First, z => z.Second));
        }
        return rows;
    }

    /// <summary>Every node layer of the report appears in the widths table as "groups kept of groups".</summary>
    static void AssertWidthsMatch(JsonObject report, string body)
    {
        var rows = WidthRows(body);
        foreach (var l in report["layers"]!.AsArray())
        {
            int block = int.Parse(Regex.Match((string)l!["name"]!, @"\d+").Value);
            string column = (string)l["kind"]! == "mlp" ? "MLP neurons kept" : "attention groups kept";
            Assert.Equal($"{l["groups_kept"]} of {(int)l["units"]! / (int)l["group_size"]!}", rows[block][column]);
        }
    }

    static string N(JsonObject r, string k) => r[k]!.GetValue<long>().ToString("N0", System.Globalization.CultureInfo.InvariantCulture);

    static string TinyOptWithTokenizer(string dir) =>
        new TinyOpt { Vocab = 50272, Hidden = 32, Heads = 4, Ffn = 64, Layers = 3, MaxPositions = 128 }.Write(dir);

    static PruneJobOptions OptJob(string src, string outDir, bool heads, bool padded = false) => new()
    {
        ModelDir = src, OutDir = outDir, CalibSource = TextSources.C4, CalibSamples = 4, CalibSeqLen = 64, ExportPadded = padded,
        Prune = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.25, UniformWidths = true, Targets = heads ? new HashSet<NodeKind> { NodeKind.Mlp, NodeKind.Heads } : new HashSet<NodeKind> { NodeKind.Mlp } },
    };

    [Fact]
    public void Stock_loadable_prune_without_eval_has_a_card_that_follows_its_report()
    {
        using var tmp = new TempDir();
        string src = TinyOptWithTokenizer(tmp.Sub("tiny-opt"));
        string outDir = tmp.Sub("out");
        PruneJob.Run(OptJob(src, outDir, heads: false), null);
        var report = Report(outDir);
        Assert.True(report["stock_loadable"]!.GetValue<bool>());
        var (front, body) = ReadCard(outDir);

        Assert.Equal(new[] { "tiny-opt" }, front["base_model"]);   // no hub id anywhere: the directory's name
        Assert.Equal(new[] { "pruned", "llmsnp" }, front["tags"]);
        Assert.Equal(new[] { "transformers" }, front["library_name"]);
        Assert.Equal(new[] { "text-generation" }, front["pipeline_tag"]);
        Assert.False(front.ContainsKey("license"));   // the source states none: the card claims none
        Assert.False(front.ContainsKey("language"));

        Assert.Contains($"**{N(report, "params_before")} → {N(report, "params_after")} parameters**", body);
        Assert.Contains("| ordering of units | `zca` |", body);
        Assert.Contains("| targets | mlp |", body);
        Assert.Contains("`--ratio 0.25`", body);
        AssertWidthsMatch(report, body);
        Assert.Equal(new[] { "48 of 64" }, WidthRows(body).Values.Select(r => r["MLP neurons kept"]).Distinct());
        Assert.DoesNotContain("## Measured", body);
        Assert.Contains($"AutoModelForCausalLM.from_pretrained(\"{outDir}\")", body);
        Assert.DoesNotContain("export gguf", body);   // no GGUF export for this family
    }

    [Fact]
    public void Not_stock_loadable_prune_points_to_its_padded_copy_and_carries_the_source_card_over()
    {
        using var tmp = new TempDir();
        string src = TinyOptWithTokenizer(tmp.Sub("tiny-opt"));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(src, "config.json")))!.AsObject();
        cfg["_name_or_path"] = "acme/tiny-opt-chat";
        File.WriteAllText(Path.Combine(src, "config.json"), cfg.ToJsonString());
        File.WriteAllText(Path.Combine(src, "README.md"),
            "---\nlicense: other\nlicense_name: acme-license   # see below\nlicense_link: 'https://example.com/license: v2'\n"
            + "language:\n  - en\n  - fr\nbase_model: [acme/tiny-opt]\nmodel-index:\n- name: tiny\n  results: []\n---\n\n# Tiny OPT chat\n");
        string outDir = tmp.Sub("out");
        PruneJob.Run(OptJob(src, outDir, heads: true, padded: true), null);
        var report = Report(outDir);
        Assert.False(report["stock_loadable"]!.GetValue<bool>());
        var (front, body) = ReadCard(outDir);

        Assert.Equal(new[] { "acme/tiny-opt-chat" }, front["base_model"]);   // config's _name_or_path, a hub id
        Assert.Equal(new[] { "other" }, front["license"]);
        Assert.Equal(new[] { "acme-license" }, front["license_name"]);
        Assert.Equal(new[] { "https://example.com/license: v2" }, front["license_link"]);
        Assert.Equal(new[] { "en", "fr" }, front["language"]);
        Assert.False(front.ContainsKey("library_name"));   // stock transformers cannot build it from config.json
        Assert.Contains("The source's own card names `acme/tiny-opt` as its base model.", body);
        Assert.Contains($"cannot load this directory: {report["stock_loadable_why_not"]}.", body);
        Assert.Contains($"from_pretrained(\"{outDir}/padded\")", body);
        Assert.Contains("| targets | mlp,heads |", body);
        AssertWidthsMatch(report, body);
        Assert.Equal(new[] { "3 of 4" }, WidthRows(body).Values.Select(r => r["attention groups kept"]).Distinct());

        // Without the padded copy the card says how to get one; the license now comes from config.json.
        cfg["license"] = "mit";
        File.WriteAllText(Path.Combine(src, "config.json"), cfg.ToJsonString());
        File.Delete(Path.Combine(src, "README.md"));
        PruneJob.Run(OptJob(src, outDir, heads: true) with { Force = true }, null);
        (front, body) = ReadCard(outDir);
        Assert.Equal(new[] { "mit" }, front["license"]);
        Assert.False(front.ContainsKey("language"));
        Assert.Contains("`llmsnp prune --export-padded` also writes", body);
        Assert.DoesNotContain("/padded\")", body);
    }

    /// <summary>With --eval the card gains this run's measurements (the numbers of the outcome), and a LLaMA-family output the GGUF command.</summary>
    [Fact]
    public void Prune_with_eval_records_the_measurements_and_the_gguf_command()
    {
        using var tmp = new TempDir();
        string outDir = tmp.Sub("stories-snp");
        var outcome = PruneJob.Run(new PruneJobOptions
        {
            ModelDir = Path.Combine(Repo.Root, "models", "stories260k"), OutDir = outDir, CalibSource = TextSources.TinyStories,
            CalibSamples = 8, CalibSeqLen = 128, EvalDataset = TextSources.TinyStories, EvalSeqLen = 128, EvalLimit = 6,
            Prune = new PruneOptions { Policy = RatioPolicyKind.Budget, Amount = 0.3, UniformWidths = true },
        }, null);
        var (front, body) = ReadCard(outDir);
        Assert.Equal(new[] { "stories260k" }, front["base_model"]);
        Assert.Equal(new[] { "transformers" }, front["library_name"]);
        Assert.Contains("`--budget 0.3`: 30.0 % of the prunable parameters removed", body);
        AssertWidthsMatch(outcome.Report, body);

        var e = outcome.Eval!;
        string row = body.Split('\n').Single(l => l.StartsWith("| perplexity ("));
        var cells = row.Trim('|').Split('|').Select(c => c.Trim()).ToArray();
        Assert.Contains("6 windows × 128 tokens", cells[0]);
        Assert.Equal(e.Dense, double.Parse(cells[1]), 3);
        Assert.Equal(e.Pruned, double.Parse(cells[2]), 3);
        Assert.Equal($"{(e.Pruned / e.Dense - 1) * 100:+0.0;-0.0} %", cells[3]);
        var s = outcome.Speed!;
        Assert.Contains($"prefill **{s.PrefillSpeedUp:F2}×**", body);
        Assert.Contains($"batch-1 decode **{s.DecodeSpeedUp:F2}×**", body);
        Assert.Contains($"weight-FLOP ratio {s.FlopRatio:F2}", body);
        Assert.Contains($"`llmsnp export gguf --model {outDir} --out stories-snp.gguf`", body);
    }

    /// <summary>An image classifier: its pipeline tag, stock loading through pruned_heads, and a top-1 row in points.</summary>
    [Fact]
    public void Image_classifier_card_has_its_pipeline_tag_and_top1_in_points()
    {
        using var tmp = new TempDir();
        string src = new TinyVit().Write(tmp.Sub("vit"));
        var calib = Enumerable.Range(0, 2).Select(i => torch.randn(new long[] { 4, 3, 32, 32 }, generator: new torch.Generator((ulong)(20 + i)))).ToList();
        JsonObject report;
        using (var model = ModelFamilies.Open(src, CPU, ScalarType.Float32))
            report = PrunedCheckpoint.Write(new PrunedCheckpoint.Request
            {
                Model = model, Options = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.5, UniformWidths = true },
                Calibration = calib, CalibrationInfo = new JsonObject { ["source"] = "images/", ["samples"] = 8, ["seed"] = 0 },
                OutDir = tmp.Sub("out"), SourceDir = src, ParamsBefore = model.ParameterCount(),
            });
        var (front, body) = ReadCard(tmp.Sub("out"));
        Assert.Equal(new[] { "image-classification" }, front["pipeline_tag"]);
        Assert.Equal(report["stock_loadable"]!.GetValue<bool>(), front.ContainsKey("library_name"));
        Assert.Contains("AutoModelForImageClassification", body);
        AssertWidthsMatch(report, body);

        var eval = new MetricPair("top1", 83.4, 79.2, 500, new JsonObject { ["images"] = 500 }, new JsonObject { ["images"] = 500 });
        string card = ModelCard.Render(report, SourceMetadata.Read(src), Modality.Image, false, false, "out", eval, null);
        Assert.Contains("| top-1 % (500 images) | 83.40 | 79.20 | -4.20 points |", card);
    }

    /// <summary>YAML scalars the card writes read back as the same strings (a name with ':' or '#', a numeric-looking one).</summary>
    [Theory]
    [InlineData("acme/model-7b")]
    [InlineData("my model: v2 # final")]
    [InlineData("1.0")]
    [InlineData("true")]
    [InlineData("say \"hi\"\\now")]
    public void Yaml_scalars_read_back_unchanged(string value)
    {
        string line = "base_model: " + ModelCard.Yaml(value);
        var v = Regex.Match(line, @"^base_model: (.+)$").Groups[1].Value;
        Assert.Equal(value, Scalar(v));
    }
}
