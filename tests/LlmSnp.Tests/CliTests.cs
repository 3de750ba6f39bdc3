using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Data;

namespace LlmSnp.Tests;

/// <summary>
/// The CLI as a user runs it: `dotnet LlmSnp.Cli.dll ...` in a child process, checking exit codes,
/// stdout (one JSON document on success, nothing on failure) and stderr (one "error: " line, no
/// stack trace) exactly.
/// </summary>
[Collection("Console")]
public sealed class CliTests : IDisposable
{
    static readonly string RepoRoot = Repo.Root;
    static string Fixture(string name) => Repo.Fixture(Path.Combine("golden-opt", name));

    readonly string _tmp;

    public CliTests()
    {
        _tmp = Path.Combine(Path.GetTempPath(), "llmsnp-cli-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(_tmp);
    }

    public void Dispose()
    {
        try { Directory.Delete(_tmp, true); } catch (IOException) { }
    }

    static CliHarness.Result Run(params string[] args) => CliHarness.Run(args);

    static JsonObject Succeeds(CliHarness.Result r) => CliHarness.SucceedsJson(r);

    /// <summary>Exit 1 (a user error, not an internal failure), nothing on stdout, one "error: " line on stderr.</summary>
    static string FailsCleanly(CliHarness.Result r, params string[] mentions) => CliHarness.FailsStrict(r, onlyLine: true, completeLine: true, mentions);

    /// <summary>As <see cref="FailsCleanly"/>, but progress lines may precede the error, which must be the last line.</summary>
    static string FailsAfterProgress(CliHarness.Result r, params string[] mentions) => CliHarness.FailsStrict(r, onlyLine: false, completeLine: true, mentions);

    /// <summary>Copies a fixture checkpoint and rewrites its config.json.</summary>
    string CopyFixture(string name, Action<JsonObject>? editConfig = null, bool withWeights = true)
    {
        string dir = Path.Combine(_tmp, name + "-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(Fixture(name)))
            if (withWeights || !f.EndsWith(".safetensors")) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        TinyOpt.CopyTokenizer(dir);   // a checkpoint carries its own tokenizer
        if (editConfig != null)
        {
            string cfgPath = Path.Combine(dir, "config.json");
            var cfg = JsonNode.Parse(File.ReadAllText(cfgPath))!.AsObject();
            editConfig(cfg);
            File.WriteAllText(cfgPath, cfg.ToJsonString());
        }
        return dir;
    }

    /// <summary>Σ numel over a safetensors file's tensors, from the raw header.</summary>
    static long CountParameters(string safetensors)
    {
        using var fs = File.OpenRead(safetensors);
        var len = new byte[8];
        fs.ReadExactly(len);
        var header = new byte[checked((int)BitConverter.ToUInt64(len))];
        fs.ReadExactly(header);
        using var doc = JsonDocument.Parse(header);
        return doc.RootElement.EnumerateObject().Where(p => p.Name != "__metadata__")
            .Sum(p => p.Value.GetProperty("shape").EnumerateArray().Aggregate(1L, (a, d) => a * d.GetInt64()));
    }

    string RowsFile(params string[] rows)
    {
        string path = Path.Combine(_tmp, $"rows-{Guid.NewGuid():N}.json");
        File.WriteAllText(path, JsonSerializer.Serialize(rows));
        return path;
    }

    // ---------------------------------------------------------------- tokenize

    [Fact]
    public void Tokenize_Text_MatchesHuggingFaceIds()
    {
        var json = Succeeds(Run("tokenize", "--text", "Hello, my dog is cute"));
        var ids = json["ids"]!.AsArray().Select(n => n!.GetValue<int>()).ToArray();
        Assert.Equal(new[] { 2, 31414, 6, 127, 2335, 16, 11962 }, ids);
        Assert.Equal(7, json["count"]!.GetValue<int>());
    }

    [Fact]
    public void Tokenize_WikiText2Rows_Gives287645Tokens()
    {
        var r = Run("tokenize", "--file", Path.Combine("eval", "data", "wikitext2-test.json"), "--rows-json");
        var json = Succeeds(r);
        Assert.Equal(287645, json["count"]!.GetValue<int>());
        Assert.Equal(287645, json["ids"]!.AsArray().Count);
        Assert.Equal(2, json["ids"]![0]!.GetValue<int>());
    }

    [Fact]
    public void Tokenize_Errors()
    {
        FailsCleanly(Run("tokenize"), "--text", "--file");
        FailsCleanly(Run("tokenize", "--file", Path.Combine(_tmp, "absent.txt")), "absent.txt");
        string bad = Path.Combine(_tmp, "bad.json");
        File.WriteAllText(bad, "{\"not\": \"rows\"}");
        FailsCleanly(Run("tokenize", "--file", bad, "--rows-json"), bad);
    }

    // ---------------------------------------------------------------- inspect

    [Fact]
    public void Inspect_PostLayerNormFixture()
    {
        string json = Path.Combine(_tmp, "inspect.json");
        var r = Run("inspect", "--model", Path.Combine("tests", "fixtures", "golden-opt", "opt-tiny-post"), "--json", json);
        var o = Succeeds(r);
        Assert.Equal("opt", o["family"]!.GetValue<string>());
        Assert.Equal("post", o["layer_norm"]!.GetValue<string>());
        Assert.Equal("float32", o["dtype"]!.GetValue<string>());
        long expected = CountParameters(Path.Combine(Fixture("opt-tiny-post"), "model.safetensors"));
        Assert.Equal(expected, o["parameters"]!.GetValue<long>());
        Assert.Equal(2, o["per_layer"]!.AsArray().Count);
        Assert.Equal(32, o["word_embed_proj_dim"]!.GetValue<int>());
        Assert.False(o["tie_word_embeddings"]!.GetValue<bool>());
        // --json writes the same document.
        Assert.True(JsonNode.DeepEquals(o, JsonNode.Parse(File.ReadAllText(json))));
    }

    [Fact]
    public void Inspect_PreLayerNormFixture_CountsParameters()
    {
        var o = Succeeds(Run("inspect", "--model", Fixture("opt-tiny-pre")));
        Assert.Equal("pre", o["layer_norm"]!.GetValue<string>());
        Assert.Equal(CountParameters(Path.Combine(Fixture("opt-tiny-pre"), "model.safetensors")), o["parameters"]!.GetValue<long>());
    }

    // ---------------------------------------------------------------- eval ppl

    // Every token of this text has an id below the fixtures' vocab_size of 512.
    const string InVocabText = "I said that the people who had been in the new year would not be there for the first time, and it was the last one. "
        + "It is what they have said about the two, and he will be at his first time in a year.";

    [Fact]
    public void EvalPpl_OnInVocabText_Works()
    {
        var ids = OptTokenizer.Bundled().Encode(InVocabText);
        Assert.True(ids.Max() < 512, $"test text has token id {ids.Max()} ≥ 512");
        Assert.True(ids.Length >= 32, $"test text has only {ids.Length} tokens");
        string rows = RowsFile(InVocabText);

        var o = Succeeds(Run("eval", "ppl", "--model", CopyFixture("opt-tiny-pre"), "--dataset", rows, "--seqlen", "16"));
        double ppl = o["perplexity"]!.GetValue<double>();
        Assert.True(double.IsFinite(ppl) && ppl > 1, $"perplexity {ppl}");
        Assert.Equal(ids.Length / 16, o["windows"]!.GetValue<int>());
        Assert.Equal(ids.Length / 16 * 16, o["tokens"]!.GetValue<long>());
        Assert.Equal(16, o["seqlen"]!.GetValue<int>());
        double nll0 = o["first_window_nll"]!.GetValue<double>();
        Assert.True(double.IsFinite(nll0) && nll0 > 0, $"first_window_nll {nll0}");
    }

    [Fact]
    public void EvalPpl_TokenIdsBeyondVocab_GiveOneLineError()
    {
        // OPT's tokenizer produces ids up to 50264; the fixtures have vocab_size 512.
        string text = string.Concat(Enumerable.Repeat("Hello, my dog is cute. ", 6));
        var ids = OptTokenizer.Bundled().Encode(text);
        Assert.Contains(ids, i => i >= 512);
        string rows = RowsFile(text);
        var r = Run("eval", "ppl", "--model", CopyFixture("opt-tiny-pre"), "--dataset", rows, "--seqlen", "16");
        FailsAfterProgress(r, "512");
    }

    [Fact]
    public void EvalPpl_Errors()
    {
        string rows = RowsFile(InVocabText);
        FailsAfterProgress(Run("eval", "ppl", "--model", CopyFixture("opt-tiny-pre"), "--dataset", rows, "--seqlen", "1000"), "1000", "max_position_embeddings");
        FailsCleanly(Run("eval", "ppl", "--model", Path.Combine(_tmp, "nowhere"), "--dataset", rows), "nowhere");
        FailsAfterProgress(Run("eval", "ppl", "--model", CopyFixture("opt-tiny-pre"), "--dataset", Path.Combine(_tmp, "absent.json")), "absent.json");
    }

    // ---------------------------------------------------------------- --model errors

    [Fact]
    public void Model_NonexistentDirectory()
    {
        string dir = Path.Combine(_tmp, "does-not-exist");
        FailsCleanly(Run("inspect", "--model", dir), dir);
    }

    [Fact]
    public void Model_DirectoryWithoutConfig()
    {
        string dir = Path.Combine(_tmp, "empty-model");
        Directory.CreateDirectory(dir);
        FailsCleanly(Run("inspect", "--model", dir), Path.Combine(dir, "config.json"));
    }

    [Fact]
    public void Model_ConfigNotJson()
    {
        string dir = CopyFixture("opt-tiny-pre");
        File.WriteAllText(Path.Combine(dir, "config.json"), "{\"model_type\": \"opt\",\n  \"hidden_size\": ");
        FailsCleanly(Run("inspect", "--model", dir), Path.Combine(dir, "config.json"), "JSON");
    }

    [Fact]
    public void Model_UnsupportedModelType()
    {
        string dir = CopyFixture("opt-tiny-pre", c => c["model_type"] = "bert");
        FailsCleanly(Run("inspect", "--model", dir), Path.Combine(dir, "config.json"), "bert");
        FailsCleanly(Run("eval", "ppl", "--model", dir), Path.Combine(dir, "config.json"), "bert");
    }

    [Fact]
    public void Model_OptWithoutBias()
    {
        string dir = CopyFixture("opt-tiny-pre", c => c["enable_bias"] = false);
        FailsCleanly(Run("inspect", "--model", dir), Path.Combine(dir, "config.json"), "enable_bias");
    }

    [Fact]
    public void Model_MissingWeights()
    {
        string dir = CopyFixture("opt-tiny-pre", withWeights: false);
        FailsCleanly(Run("inspect", "--model", dir), dir, "model.safetensors");
    }

    [Fact]
    public void Model_TensorShapeDisagreesWithConfig()
    {
        string dir = CopyFixture("opt-tiny-pre", c => c["hidden_size"] = 32);
        string line = FailsCleanly(Run("inspect", "--model", dir), dir, "shape");
        Assert.Contains("embed_positions.weight", line);
    }

    [Fact]
    public void Model_ConfigFieldWithWrongType()
    {
        string dir = CopyFixture("opt-tiny-pre", c => c["num_hidden_layers"] = "three");
        FailsCleanly(Run("inspect", "--model", dir), Path.Combine(dir, "config.json"), "num_hidden_layers");
    }

    // ---------------------------------------------------------------- prune option errors

    void PruneFails(string[] extra, params string[] mentions)
    {
        string parent = Path.Combine(_tmp, "prune-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        var args = new List<string> { "prune", "--model", CopyFixture("opt-tiny-pre"), "--out", outDir, "--calib-samples", "2" };
        args.AddRange(extra);
        FailsCleanly(Run(args.ToArray()), mentions);
        Assert.False(Directory.Exists(outDir), $"{outDir} was created");
        Assert.Empty(Directory.GetFileSystemEntries(parent));   // no temporary siblings either
    }

    [Fact]
    public void Prune_TwoRatioPolicies() => PruneFails(new[] { "--ratio", "0.1", "--budget", "0.2" }, "--ratio", "--budget");

    [Fact]
    public void Prune_RatioOutOfRange() => PruneFails(new[] { "--ratio", "1.5" }, "--ratio", "1.5");

    [Fact]
    public void Prune_UnknownTarget() => PruneFails(new[] { "--targets", "foo" }, "--targets", "foo");

    [Fact]
    public void Prune_CalibrationIdsBeyondVocab_GiveOneLineError()
    {
        string outDir = Path.Combine(_tmp, "prune-oov", "out");
        Directory.CreateDirectory(Path.GetDirectoryName(outDir)!);
        var r = Run("prune", "--model", CopyFixture("opt-tiny-pre"), "--out", outDir, "--ratio", "0.1", "--calib-samples", "2", "--calib-seqlen", "16");
        FailsAfterProgress(r, "512");
        Assert.False(Directory.Exists(outDir));
    }

    [Fact]
    public void Prune_CalibSeqLenBeyondMaxPositions() => PruneFails(new[] { "--calib-seqlen", "100000" }, "100000", "max_position_embeddings");
}
