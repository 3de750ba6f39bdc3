using System.Diagnostics;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Models;
using LlmSnp.Reliability;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// Reliability: seeded fuzzing of every on-disk input (safetensors headers, sharded indexes, OPT, LLaMA-family
/// and ViT configs and model directories, tokenizer files, labels.tsv), and the `prune` command as a user runs it (child process) when it is killed,
/// pointed at an existing, unwritable or full destination, fed broken or degenerate weights, run
/// twice, or given configs it does not support.
/// </summary>
[Collection("Console")]
public sealed class ReliabilityTests : IDisposable
{
    readonly ITestOutputHelper _out;
    readonly TempDir _tmp = new();

    public ReliabilityTests(ITestOutputHelper output) { _out = output; }

    public void Dispose() => _tmp.Dispose();

    // ================================================================ fuzzing

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

    // ================================================================ the CLI as a user runs it

    // The CLI in a child process through the shared harness; Succeeds here is the JSON-returning one.
    static JsonObject Succeeds(CliHarness.Result r) => CliHarness.SucceedsJson(r);

    /// <summary>Exit 1, empty stdout, exactly one "error: " line (the last; progress lines may precede it unless <paramref name="onlyLine"/>).</summary>
    static string FailsWithOneLine(CliHarness.Result r, bool onlyLine, params string[] mentions) => CliHarness.FailsStrict(r, onlyLine, completeLine: false, mentions);

    static CliHarness.Result Run(string[] args, string? bashPrelude = null, IDictionary<string, string>? env = null) => CliHarness.Run(args, bashPrelude, env);

    /// <summary>SHA-256 and mtime of every file under a directory, by relative path.</summary>
    static SortedDictionary<string, (string Sha, DateTime MTime, long Length)> Snapshot(string dir)
    {
        var d = new SortedDictionary<string, (string, DateTime, long)>(StringComparer.Ordinal);
        foreach (var f in Directory.GetFiles(dir, "*", SearchOption.AllDirectories))
        {
            using var s = File.OpenRead(f);
            d[Path.GetRelativePath(dir, f)] = (Convert.ToHexStringLower(SHA256.HashData(s)), File.GetLastWriteTimeUtc(f), new FileInfo(f).Length);
        }
        return d;
    }

    static void AssertSameSnapshot(SortedDictionary<string, (string Sha, DateTime MTime, long Length)> before, string dir, string what)
    {
        var after = Snapshot(dir);
        Assert.True(before.Keys.SequenceEqual(after.Keys), $"{what}: files changed: [{string.Join(", ", before.Keys)}] → [{string.Join(", ", after.Keys)}]");
        foreach (var (k, v) in before)
        {
            Assert.True(v.Sha == after[k].Sha, $"{what}: {k} changed content");
            Assert.True(v.MTime == after[k].MTime, $"{what}: {k} mtime changed {v.MTime:o} → {after[k].MTime:o}");
        }
    }

    static string[] Siblings(string parent, string name) =>
        Directory.GetFileSystemEntries(parent).Select(Path.GetFileName).Where(n => n != name).Select(n => n!).OrderBy(n => n, StringComparer.Ordinal).ToArray();

    /// <summary>A small OPT whose vocabulary covers the bundled tokenizer (calibration ids reach ~50265).</summary>
    static TinyOpt SmallOpt => new() { Vocab = 50272, Hidden = 32, Heads = 4, Ffn = 64, Layers = 2, MaxPositions = 64 };

    static readonly string[] QuickCalib = { "--calib", "wikitext2", "--calib-samples", "16", "--calib-seqlen", "32" };

    static string[] PruneArgs(string model, string outDir, params string[] extra) =>
        new[] { "prune", "--model", model, "--out", outDir }.Concat(QuickCalib).Concat(extra).ToArray();

    // ---------------------------------------------------------------- atomic output

    [Fact]
    public async Task Prune_killed_once_its_temporary_directory_appears_leaves_no_output_and_the_input_untouched()
    {
        string model = new TinyOpt { Vocab = 50272, Hidden = 64, Heads = 4, Ffn = 256, Layers = 6, MaxPositions = 128 }.Write(_tmp.Sub("model"));
        var before = Snapshot(model);
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        string[] args = { "prune", "--model", model, "--out", outDir, "--calib", "wikitext2", "--calib-samples", "256", "--calib-seqlen", "64", "--ratio", "0.3" };
        var stale = new List<string>();

        // First kill: the moment the temporary sibling appears (before any weight is written).
        // Second kill: a second later, while blocks are being pruned and streamed into it.
        foreach (double delay in new[] { 0.0, 1.0 })
        {
            using var p = Process.Start(CliHarness.Psi(args))!;
            var stderr = p.StandardError.ReadToEndAsync();
            var stdout = p.StandardOutput.ReadToEndAsync();
            var sw = Stopwatch.StartNew();
            string? tmpSeen = null;
            bool killed = false;
            TimeSpan seenAt = TimeSpan.Zero;
            while (!p.HasExited && sw.Elapsed < TimeSpan.FromSeconds(120))
            {
                if (tmpSeen == null && (tmpSeen = Directory.GetDirectories(parent, ".out.tmp-*").Except(stale).FirstOrDefault()) != null) seenAt = sw.Elapsed;
                if (tmpSeen != null && (sw.Elapsed - seenAt).TotalSeconds >= delay)
                {
                    p.Kill(entireProcessTree: true);
                    killed = true;
                    break;
                }
                // A blocking sleep: an awaited delay can wait on a starved thread pool longer than the run lasts.
                Thread.Sleep(1);
            }
            await p.WaitForExitAsync();
            string err = await stderr;
            await stdout;
            Assert.True(tmpSeen != null, $"prune finished (exit {p.ExitCode}) before its temporary directory was seen\n{err}");
            if (!killed)
            {
                // Pruning finished within the delay: then the output must be complete (and is removed for the next round).
                Assert.True(p.ExitCode == 0, err);
                using (var m = new OptModel(outDir)) Assert.Equal(6, m.BlockCount);
                Directory.Delete(outDir, true);
                _out.WriteLine($"delay {delay} s: prune finished before the kill");
                continue;
            }
            string[] inTmp = Directory.Exists(tmpSeen) ? Directory.GetFileSystemEntries(tmpSeen).Select(Path.GetFileName).Select(n => n!).ToArray() : Array.Empty<string>();
            _out.WriteLine($"killed {sw.Elapsed.TotalSeconds:F2} s after start, {delay} s after {Path.GetFileName(tmpSeen)} appeared; it held [{string.Join(", ", inTmp)}]");
            stale.Add(tmpSeen);
            Assert.False(Directory.Exists(outDir), "the --out directory exists after the kill");
            Assert.False(File.Exists(outDir));
            AssertSameSnapshot(before, model, "input model");
            // What a kill leaves behind: only hidden temporary siblings (nothing can clean up after SIGKILL).
            Assert.All(Siblings(parent, "out"), n => Assert.StartsWith(".out.tmp-", n));
        }
        _out.WriteLine("left behind: " + string.Join(", ", Siblings(parent, "out")));

        // A later run into the same --out is not disturbed by the stale temporary directory (the
        // variance ordering only keeps this second, complete run short).
        var sw2 = Stopwatch.StartNew();
        var report = Succeeds(Run(args.Concat(new[] { "--ordering", "variance" }).ToArray()));
        _out.WriteLine($"full run: {sw2.Elapsed.TotalSeconds:F2} s");
        Assert.Equal(outDir, report["output"]!.GetValue<string>());
        using (var m = new OptModel(outDir)) Assert.Equal(6, m.BlockCount);
        AssertSameSnapshot(before, model, "input model after a full run");
    }

    [Fact]
    public void Prune_onto_an_existing_directory_needs_force_and_force_replaces_it()
    {
        string model = SmallOpt.Write(_tmp.Sub("model"));
        string parent = _tmp.Sub("dest");
        string outDir = Path.Combine(parent, "out");
        Directory.CreateDirectory(Path.Combine(outDir, "sub"));
        File.WriteAllText(Path.Combine(outDir, "precious.txt"), "do not lose me");
        File.WriteAllText(Path.Combine(outDir, "sub", "nested.bin"), "nested");
        var existing = Snapshot(outDir);

        var r = Run(PruneArgs(model, outDir, "--ratio", "0.25"));
        _out.WriteLine(FailsWithOneLine(r, onlyLine: false, outDir, "--force"));
        AssertSameSnapshot(existing, outDir, "existing --out without --force");
        Assert.Empty(Siblings(parent, "out"));

        var o = Succeeds(Run(PruneArgs(model, outDir, "--ratio", "0.25", "--force")));
        Assert.False(File.Exists(Path.Combine(outDir, "precious.txt")), "--force kept the old directory's files");
        Assert.False(Directory.Exists(Path.Combine(outDir, "sub")));
        Assert.True(File.Exists(Path.Combine(outDir, "model.safetensors")));
        Assert.True(File.Exists(Path.Combine(outDir, "config.json")));
        Assert.True(File.Exists(Path.Combine(outDir, "pruning_config.json")));
        Assert.Empty(Siblings(parent, "out"));   // neither .old-* nor .tmp-* left
        Assert.Equal(outDir, o["output"]!.GetValue<string>());
    }

    // ---------------------------------------------------------------- unwritable and full destinations

    [Fact]
    public void Prune_to_an_unwritable_destination_fails_with_one_line_and_exit_1()
    {
        string model = SmallOpt.Write(_tmp.Sub("model"));
        var before = Snapshot(model);

        // The parent of --out is a regular file.
        string file = _tmp.Sub("xyz-file");
        File.WriteAllText(file, "a file, not a directory");
        string outDir = Path.Combine(file, "out");
        _out.WriteLine(FailsWithOneLine(Run(PruneArgs(model, outDir, "--ratio", "0.25")), onlyLine: false, file));
        Assert.Equal("a file, not a directory", File.ReadAllText(file));

        // A destination even root cannot create directories in: /proc.
        string proc = $"/proc/llmsnp-out-{Guid.NewGuid():N}";
        _out.WriteLine(FailsWithOneLine(Run(PruneArgs(model, proc, "--ratio", "0.25")), onlyLine: false, "/proc"));
        Assert.False(Directory.Exists(proc));
        AssertSameSnapshot(before, model, "input model");
    }

    const string EnospcShim = """
        #define _GNU_SOURCE
        #include <dlfcn.h>
        #include <errno.h>
        #include <stdlib.h>
        #include <sys/stat.h>
        #include <sys/types.h>
        #include <sys/uio.h>
        #include <unistd.h>
        /* Regular-file writes fail with ENOSPC once ENOSPC_AFTER_BYTES bytes have been written: a full disk. */
        static long long left = -2;
        static int full(int fd, size_t n) {
            struct stat st;
            if (left == -2) { const char* s = getenv("ENOSPC_AFTER_BYTES"); left = s ? atoll(s) : -1; }
            if (left < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
            if ((long long)n > left) { left = 0; errno = ENOSPC; return 1; }
            left -= (long long)n;
            return 0;
        }
        static size_t total(const struct iovec* v, int c) { size_t n = 0; for (int i = 0; i < c; i++) n += v[i].iov_len; return n; }
        ssize_t write(int fd, const void* b, size_t n) {
            static ssize_t (*real)(int, const void*, size_t); if (!real) real = dlsym(RTLD_NEXT, "write");
            return full(fd, n) ? -1 : real(fd, b, n); }
        ssize_t pwrite(int fd, const void* b, size_t n, off_t o) {
            static ssize_t (*real)(int, const void*, size_t, off_t); if (!real) real = dlsym(RTLD_NEXT, "pwrite");
            return full(fd, n) ? -1 : real(fd, b, n, o); }
        ssize_t pwrite64(int fd, const void* b, size_t n, off_t o) {
            static ssize_t (*real)(int, const void*, size_t, off_t); if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
            return full(fd, n) ? -1 : real(fd, b, n, o); }
        ssize_t writev(int fd, const struct iovec* v, int c) {
            static ssize_t (*real)(int, const struct iovec*, int); if (!real) real = dlsym(RTLD_NEXT, "writev");
            return full(fd, total(v, c)) ? -1 : real(fd, v, c); }
        ssize_t pwritev(int fd, const struct iovec* v, int c, off_t o) {
            static ssize_t (*real)(int, const struct iovec*, int, off_t); if (!real) real = dlsym(RTLD_NEXT, "pwritev");
            return full(fd, total(v, c)) ? -1 : real(fd, v, c, o); }
        """;

    /// <summary>Compiles the ENOSPC shim with the system C compiler; null where there is none.</summary>
    string? BuildEnospcShim()
    {
        string src = _tmp.Sub("enospc.c"), so = _tmp.Sub("libenospc.so");
        File.WriteAllText(src, EnospcShim);
        foreach (var cc in new[] { "cc", "gcc", "clang" })
        {
            try
            {
                using var p = Process.Start(new ProcessStartInfo(cc, new[] { "-shared", "-fPIC", "-O1", "-o", so, src, "-ldl" })
                { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false })!;
                string err = p.StandardError.ReadToEnd();
                p.WaitForExit();
                if (p.ExitCode == 0 && File.Exists(so)) return so;
                _out.WriteLine($"{cc}: {err}");
            }
            catch (System.ComponentModel.Win32Exception) { }
        }
        return null;
    }

    [Fact]
    public void Prune_onto_a_full_disk_fails_cleanly_and_leaves_nothing()
    {
        // A full disk without mounting anything: an LD_PRELOAD shim makes regular-file writes fail
        // with ENOSPC after 1 MB, in the child process only.
        string? shim = BuildEnospcShim();
        if (shim == null)
        {
            _out.WriteLine("no C compiler: the disk-full simulation is not run");
            return;
        }
        string model = SmallOpt.Write(_tmp.Sub("model"));
        var before = Snapshot(model);
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        var env = new Dictionary<string, string> { ["LD_PRELOAD"] = shim, ["ENOSPC_AFTER_BYTES"] = (1 << 20).ToString() };
        var r = Run(PruneArgs(model, outDir, "--ratio", "0.25"), env: env);
        string line = FailsWithOneLine(r, onlyLine: false, outDir);
        _out.WriteLine(line);
        Assert.Contains("No space left on device", line);
        Assert.False(Directory.Exists(outDir));
        Assert.Empty(Siblings(parent, "out"));   // the temporary directory was removed
        AssertSameSnapshot(before, model, "input model");
    }

    [Fact]
    public void Prune_when_a_file_exceeds_the_file_size_limit_fails_cleanly()
    {
        // RLIMIT_FSIZE with SIGXFSZ ignored: write() fails with EFBIG, as on a file system with a
        // per-file size limit. (W^X double mapping needs an unlimited file size, so it is turned off.)
        string model = SmallOpt.Write(_tmp.Sub("model"));
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        var r = Run(PruneArgs(model, outDir, "--ratio", "0.25"), bashPrelude: "trap '' XFSZ; ulimit -f 1024",
            env: new Dictionary<string, string> { ["DOTNET_EnableWriteXorExecute"] = "0" });
        FailsWithOneLine(r, onlyLine: false, outDir);
        Assert.False(Directory.Exists(outDir));
        Assert.Empty(Siblings(parent, "out"));
    }

    // ---------------------------------------------------------------- numerical guards

    [Fact]
    public void Prune_with_nan_weights_fails_naming_the_layer_and_writes_nothing()
    {
        string model = (SmallOpt with
        {
            Edit = t => t["model.decoder.layers.1.fc1.weight"][3, 5].fill_(float.NaN),
        }).Write(_tmp.Sub("model"));
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        string line = FailsWithOneLine(Run(PruneArgs(model, outDir, "--ratio", "0.25")), onlyLine: false, "layers.1.");
        _out.WriteLine(line);
        Assert.Contains("non-finite", line);
        Assert.False(Directory.Exists(outDir));
        Assert.Empty(Siblings(parent, "out"));
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

    // ---------------------------------------------------------------- determinism

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

    // ---------------------------------------------------------------- unsupported configs

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
}
