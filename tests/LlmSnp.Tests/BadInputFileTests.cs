using System.IO.Compression;
using System.Text.Json.Nodes;
using LlmSnp.Data.Images;
using LlmSnp.Models;
using Xunit.Abstractions;
using static LlmSnp.Tests.CliRuns;

namespace LlmSnp.Tests;

/// <summary>
/// Files that are not what they claim: "text" that is compressed, binary or not UTF-8, a config.json that is not a
/// JSON object of the right fields, configs the families do not support, label files naming classes the model lacks.
/// Each is one line naming the file (and field or line), exit 1, before anything is computed from it.
/// </summary>
[Collection("Console")]
public sealed class BadInputFileTests : IDisposable
{
    readonly ITestOutputHelper _out;
    readonly TempDir _tmp = new();
    public BadInputFileTests(ITestOutputHelper o) { _out = o; }
    public void Dispose() => _tmp.Dispose();

    string StoriesCopy(string name)
    {
        string dir = _tmp.Sub(name);
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(Path.Combine(Repo.Root, "models", "stories260k"))) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        return dir;
    }

    static byte[] Gzip(string text)
    {
        using var ms = new MemoryStream();
        using (var gz = new GZipStream(ms, CompressionLevel.Fastest)) gz.Write(System.Text.Encoding.UTF8.GetBytes(text));
        return ms.ToArray();
    }

    /// <summary>
    /// Each kind of non-text (gzip, zstd, xz, zip, NUL bytes, latin-1, control characters, random bytes), as a plain
    /// file and inside a .jsonl, through every command that reads a text dataset: the line names the file and what it is.
    /// </summary>
    [Fact]
    public void Every_non_text_dataset_is_refused_naming_the_file_by_every_command_that_reads_text()
    {
        string model = StoriesCopy("model");
        const string story = "Once upon a time there was a little girl who loved to play in the park with her dog.\n";
        var rng = new Random(7);
        var random = new byte[4096];
        rng.NextBytes(random);
        var kinds = new (string Name, byte[] Bytes, string Mention)[]
        {
            ("gzip", Gzip(string.Concat(Enumerable.Repeat(story, 20))), "gzip"),
            ("zstd", new byte[] { 0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x58, 0x61, 0x62 }, "zstd"),
            ("xz", new byte[] { 0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00, 0x00, 0x04 }, "xz"),
            ("zip", new byte[] { 0x50, 0x4B, 0x03, 0x04, 0x14, 0x00, 0x00, 0x00 }, "zip"),
            ("nul", System.Text.Encoding.UTF8.GetBytes(story + "\0" + story), "NUL"),
            ("latin1", System.Text.Encoding.Latin1.GetBytes(string.Concat(Enumerable.Repeat("Le café était déjà fermé. ", 20))), "UTF-8"),
            ("controls", System.Text.Encoding.UTF8.GetBytes(string.Concat(Enumerable.Repeat(story + "\u0001\u0002\u0003\u0004\u0005", 3))), "control characters"),
            ("random", random, "not text"),
        };
        int runs = 0;
        foreach (var (name, bytes, mention) in kinds)
        {
            string txt = _tmp.Sub($"{name}.txt");
            File.WriteAllBytes(txt, bytes);
            string jsonl = _tmp.Sub($"{name}.jsonl");
            // A .jsonl whose one "text" field holds the same bytes (raw, as a broken export would write them).
            File.WriteAllBytes(jsonl, System.Text.Encoding.UTF8.GetBytes("{\"text\": \"").Concat(bytes.Where(b => b != (byte)'"' && b != (byte)'\\' && b != (byte)'\n')).Concat(System.Text.Encoding.UTF8.GetBytes("\"}\n")).ToArray());
            var commands = new List<string[]>
            {
                new[] { "eval", "ppl", "--model", model, "--dataset", txt, "--seqlen", "16" },
                new[] { "tokenize", "--model", model, "--file", txt },
                new[] { "prune", "--model", model, "--out", _tmp.Sub($"{name}-pruned"), "--calib", txt, "--calib-samples", "2", "--calib-seqlen", "16" },
                new[] { "eval", "ppl", "--model", model, "--dataset", jsonl, "--seqlen", "16" },
            };
            foreach (var args in commands)
            {
                string file = args.Contains(jsonl) ? jsonl : txt;
                // Inside a .jsonl a random byte may end the line or the string first: then it is refused as JSON, still naming the file.
                var r = Run(args);
                string line = FailsWithOneLine(r, onlyLine: false, file);
                if (file == txt) Assert.True(line.Contains(mention), $"{name}: the line should say '{mention}'\n{r}");
                _out.WriteLine($"{name,-9} {args[0]} {args[1]}: {line}");
                runs++;
            }
        }
        Assert.False(Directory.EnumerateDirectories(_tmp.Path, "*-pruned").Any());
        _out.WriteLine($"{runs} runs");
    }

    /// <summary>
    /// A config.json that is truncated, not an object, or has a field of the wrong type or value, through every
    /// command that reads one (convert and export gguf included): one line naming config.json, and nothing written.
    /// </summary>
    [Fact]
    public void Every_command_that_reads_a_config_names_a_malformed_config_json()
    {
        var configs = new (string Name, Func<string, string> Edit, string Mention)[]
        {
            ("truncated", c => c[..(c.Length / 2)], "not valid JSON"),
            ("array", _ => "[1, 2, 3]", "config.json"),
            ("hidden_size as text", c => Set(c, "hidden_size", JsonValue.Create("wide")), "hidden_size"),
            ("negative layers", c => Set(c, "num_hidden_layers", JsonValue.Create(-1)), "num_hidden_layers"),
            ("rope_theta zero", c => Set(c, "rope_theta", JsonValue.Create(0.0)), "rope_theta"),
        };
        int runs = 0;
        foreach (var (name, edit, mention) in configs)
        {
            string model = StoriesCopy($"model-{runs}");
            string cfg = Path.Combine(model, "config.json");
            File.WriteAllText(cfg, edit(File.ReadAllText(cfg)));
            var before = Snapshot(model);
            string dest = _tmp.Sub($"dest-{runs}");
            Directory.CreateDirectory(dest);
            var commands = new[]
            {
                new[] { "convert", "--model", model, "--out", Path.Combine(dest, "converted"), "--to", "float16" },
                new[] { "convert", "--model", model, "--out", Path.Combine(dest, "converted") },
                new[] { "export", "gguf", "--model", model, "--out", Path.Combine(dest, "m.gguf") },
                new[] { "inspect", "--model", model },
                new[] { "eval", "ppl", "--model", model, "--dataset", "tinystories", "--seqlen", "16", "--max-windows", "1" },
                new[] { "generate", "--model", model, "--prompt", "Once", "--max-new-tokens", "2" },
                new[] { "prune", "--model", model, "--out", Path.Combine(dest, "pruned"), "--calib", "tinystories", "--calib-samples", "2", "--calib-seqlen", "16" },
            };
            // convert rewrites the weights of any checkpoint and copies its config's fields as they are: it refuses a
            // config.json that is not a JSON object, and leaves the fields to the commands that use them.
            bool structural = name is "truncated" or "array";
            foreach (var args in commands.Where(a => structural || a[0] != "convert"))
            {
                var r = Run(args);
                string line = FailsWithOneLine(r, onlyLine: false, cfg, mention);
                _out.WriteLine($"{name,-20} {args[0]} {args[1]}: {line}");
                runs++;
            }
            Assert.Empty(Directory.GetFileSystemEntries(dest));
            AssertSameSnapshot(before, model, $"{name}: input model");
        }
        _out.WriteLine($"{runs} runs");

        static string Set(string json, string field, JsonNode value)
        {
            var o = JsonNode.Parse(json)!.AsObject();
            o[field] = value;
            return o.ToJsonString();
        }
    }

    /// <summary>
    /// A 60-byte config.json must not make the loader allocate gigabytes: OptConfig.From builds
    /// int[num_hidden_layers] twice before anything is checked against the checkpoint (2^27 layers: 1 GB,
    /// 2^28: 2 GB, int.MaxValue: OutOfMemoryException).
    /// </summary>
    [Fact]
    public void Config_with_a_huge_layer_count_is_rejected_without_allocating()
    {
        string dir = _tmp.Sub("huge-layers");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), new JsonObject
        {
            ["model_type"] = "opt", ["vocab_size"] = 16, ["hidden_size"] = 8, ["num_hidden_layers"] = 1 << 27,
            ["num_attention_heads"] = 2, ["ffn_dim"] = 16,
        }.ToJsonString());
        long before = GC.GetAllocatedBytesForCurrentThread();
        var e = Assert.Throws<LlmSnpException>(() => OptConfig.From(ConfigFile.Load(dir)));
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.Contains("num_hidden_layers", e.Message);
        Assert.Contains(Path.Combine(dir, "config.json"), e.Message);
        Assert.True(allocated < 64L << 20, $"loading the config allocated {allocated} bytes");
    }

    [Fact]
    public void Prune_of_an_opt_without_biases_fails_naming_the_field()
    {
        string model = SmallOpt.Write(_tmp.Sub("model"));
        string cfgPath = Path.Combine(model, "config.json");
        var cfg = JsonNode.Parse(File.ReadAllText(cfgPath))!.AsObject();
        cfg["enable_bias"] = false;
        File.WriteAllText(cfgPath, cfg.ToJsonString());
        string outDir = _tmp.Sub("out");
        FailsWithOneLine(Run(PruneArgs(model, outDir, "--ratio", "0.25")), onlyLine: true, cfgPath, "enable_bias");
        Assert.False(Directory.Exists(outDir));
    }

    [Fact]
    public void Vit_with_non_square_patches_fails_naming_the_field()
    {
        string vit = new TinyVit { EditConfig = c => c["patch_size"] = new JsonArray(16, 8) }.Write(_tmp.Sub("vit"));
        string cfgPath = Path.Combine(vit, "config.json");
        FailsWithOneLine(Run(new[] { "inspect", "--model", vit }), onlyLine: true, cfgPath, "patch_size");

        // prune with an image folder reaches the same check before anything is written.
        string outDir = _tmp.Sub("out");
        FailsWithOneLine(Run(new[] { "prune", "--model", vit, "--out", outDir, "--calib", Path.Combine("eval", "data", "imagenet-val"), "--ratio", "0.25" }),
            onlyLine: true, cfgPath, "patch_size");
        Assert.False(Directory.Exists(outDir));

        // With the default (text) calibration, prune refuses the option first: still one clean line, but it
        // names --calib, not the config field.
        string line = FailsWithOneLine(Run(new[] { "prune", "--model", vit, "--out", outDir, "--ratio", "0.25" }), onlyLine: true, "--calib");
        _out.WriteLine(line);
        Assert.False(Directory.Exists(outDir));
    }

    [Fact]
    public void A_class_id_the_model_lacks_is_an_error_naming_the_labels_file_and_line()
    {
        string images = _tmp.Sub("images");
        Directory.CreateDirectory(images);
        var src = File.ReadLines(Path.Combine(Repo.Root, "eval", "data", "imagenet-val", "labels.tsv")).Take(3).Select(l => l.Split('\t')[0]).ToArray();
        foreach (var f in src)
        {
            string from = Path.Combine(Repo.Root, "eval", "data", "imagenet-val", f);
            if (!File.Exists(from)) from = Path.Combine(Repo.Root, "eval", "data", "imagenet-val", "images", f);
            File.Copy(from, Path.Combine(images, f));
        }
        string labels = Path.Combine(images, ImageSet.LabelsFile);
        // vit-tiny has 1000 classes: 999 is its last, 1000 is none of them.
        File.WriteAllLines(labels, new[] { $"{src[0]}\t999", $"{src[1]}\t1000", $"{src[2]}\t5" });
        var e = Assert.Throws<LlmSnpException>(() => ImageSet.Load(images, classes: 1000));
        Assert.Contains($"{labels}:2", e.Message);
        Assert.Contains("1000 classes", e.Message);
        Assert.Equal(3, ImageSet.Load(images).Images.Count);   // without the model's class count, the file itself is valid

        string vit = Path.Combine(Repo.Root, "models", "vit-tiny");
        CliHarness.FailsWithOneLine(CliHarness.Run(new[] { "eval", "accuracy", "--model", vit, "--images", images }), onlyLine: false, 1, $"{labels}:2", "1000");
        // prune measures the dense model first: the same error, before anything is written.
        string outDir = _tmp.Sub("vit-out");
        CliHarness.FailsWithOneLine(CliHarness.Run(new[] { "prune", "--model", vit, "--out", outDir, "--calib", Path.Combine(Repo.Root, "eval", "data", "imagenet-val"),
            "--calib-samples", "4", "--eval", "accuracy", "--images", images, "--ratio", "0.2" }), onlyLine: false, 1, $"{labels}:2");
        Assert.False(Directory.Exists(outDir));
    }
}
