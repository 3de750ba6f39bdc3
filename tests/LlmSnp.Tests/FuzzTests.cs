using System.Text.Json;
using LlmSnp.Reliability;
using Xunit.Abstractions;
using static LlmSnp.Tests.CliRuns;

namespace LlmSnp.Tests;

/// <summary>
/// Seeded fuzzing of every on-disk input (safetensors headers, sharded indexes, pytorch_model.bin, each family's configs
/// and model directories, quantization configs, tokenizer files and their options, labels.tsv): no crash, no hang, every
/// error names the file; any case replays from (seed, index) alone.
/// </summary>
[Collection("Console")]
public sealed class FuzzTests : IDisposable
{
    readonly ITestOutputHelper _out;
    readonly TempDir _tmp = new();
    public FuzzTests(ITestOutputHelper o) { _out = o; }
    public void Dispose() => _tmp.Dispose();

    public const int FuzzCases = 2000;
    public const int FuzzSeed = 20240611;

    /// <summary>One fuzzing run shared by the fuzz tests (about 15 s for 2000 cases).</summary>
    static readonly Lazy<(FuzzReport Report, string Json)> Fuzz = new(() =>
    {
        string work = Path.Combine(Path.GetTempPath(), "llmsnp-fuzz-" + Guid.NewGuid().ToString("N"));
        try
        {
            var r = HeaderFuzzer.Run(FuzzCases, FuzzSeed, work, TimeSpan.FromSeconds(10));
            return (r, r.ToJson().ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        }
        finally
        {
            try { Directory.Delete(work, true); } catch (IOException) { }
        }
    });

    static void WriteFuzzJson(string json, string dir)
    {
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "fuzz-ci.json"), json);
        // The committed copy (eval/reliability/fuzz-ci.json) is refreshed by hand: LLMSNP_RELIABILITY_OUT=path.
        if (Environment.GetEnvironmentVariable("LLMSNP_RELIABILITY_OUT") is { Length: > 0 } copy) File.WriteAllText(copy, json);
    }

    [Fact]
    public void Fuzz_ci_2000_cases_no_crashes_no_hangs_every_error_names_the_file()
    {
        var (r, json) = Fuzz.Value;
        WriteFuzzJson(json, _tmp.Sub("eval-reliability"));
        _out.WriteLine(json);
        Assert.Equal(FuzzCases, r.Cases);
        Assert.Equal(r.Cases, r.Loaded + r.CleanErrors + r.Crashes + r.Hangs);
        Assert.True(r.Loaded > r.Cases / 10, $"only {r.Loaded} cases loaded: the generator's valid artefacts are broken");
        Assert.True(r.CleanErrors > r.Cases / 2, $"only {r.CleanErrors} clean errors");
        Assert.True(r.Crashes == 0, $"{r.Crashes} crashes:\n{string.Join("\n", r.CrashExamples)}");
        Assert.True(r.Hangs == 0, $"{r.Hangs} hangs:\n{string.Join("\n", r.HangExamples)}");
        Assert.True(r.CleanErrorsWithoutPath == 0, $"{r.CleanErrorsWithoutPath} errors do not name the file:\n{string.Join("\n", r.UnnamedErrorExamples)}");
        Assert.True(r.MemoryFindings.Count == 0, string.Join("\n", r.MemoryFindings));
        // Every target (each family's model directories, tokenizer and labels files too) is exercised, and some of each load.
        foreach (var t in Enum.GetNames<HeaderFuzzer.Target>())
            Assert.True(r.ByTarget.TryGetValue(t, out var c) && c[0] >= 50 && c[1] > 0, $"target {t}: {(c == null ? "no cases" : string.Join("/", c))}");
    }

    [Fact]
    public void Fuzz_cases_replay_identically()
    {
        // Any finding can be replayed from (seed, index) alone.
        for (int i = 0; i < 40; i++)
        {
            string da = _tmp.Sub($"replay-a-{i}"), db = _tmp.Sub($"replay-b-{i}");
            var a = HeaderFuzzer.RunOne(FuzzSeed, i, da);
            var b = HeaderFuzzer.RunOne(FuzzSeed, i, db);
            Assert.Equal((a.Target, a.Mutation, a.Outcome, a.ExceptionType), (b.Target, b.Mutation, b.Outcome, b.ExceptionType));
            Assert.Equal(a.Detail?.Replace(da, "X"), b.Detail?.Replace(db, "X"));
            Assert.Equal((a.Target, a.Mutation), HeaderFuzzer.Describe(FuzzSeed, i));
        }
    }
}
