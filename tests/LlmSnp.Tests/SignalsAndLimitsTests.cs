using System.Diagnostics;
using LlmSnp.Models;
using Xunit.Abstractions;

namespace LlmSnp.Tests;

/// <summary>
/// A run stopped from outside: every stop signal on every command that writes, a kill mid-write, and each resource
/// limit (file size, address space, open files, CPU time), through the CLI and through the `llmsnp` launcher. A run
/// is caught mid-write by the write shim (WriteShim), so the signal always lands while an output is half-written.
/// </summary>
[Collection("Console")]
public sealed class SignalsAndLimitsTests : IDisposable
{
    readonly ITestOutputHelper _out;
    readonly TempDir _tmp = new();
    public SignalsAndLimitsTests(ITestOutputHelper o) { _out = o; }
    public void Dispose() => _tmp.Dispose();

    static string Stories => Path.Combine(Repo.Root, "models", "stories260k");

    /// <summary>A private copy of stories260K (the input every run must leave untouched).</summary>
    string StoriesCopy(string name)
    {
        string dir = _tmp.Sub(name);
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(Stories)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        return dir;
    }

    /// <summary>(name, number) of the signals the CLI handles; each ends the run with exit 128 + number.</summary>
    static readonly (string Name, int Number)[] StopSignals = { ("SIGHUP", 1), ("SIGINT", 2), ("SIGQUIT", 3), ("SIGTERM", 15), ("SIGXCPU", 24) };

    /// <summary>A command that writes, the path fragment its output is staged under, and the arguments for an output directory and a TMPDIR.</summary>
    sealed record Writer(string Name, string StagedUnder, Func<string, string, string, string[]> Args);

    static readonly Writer[] Writers =
    {
        new("prune", ".out.tmp-", (model, dest, _) => new[] { "prune", "--model", model, "--out", Path.Combine(dest, "out"), "--calib", "tinystories",
            "--calib-samples", "4", "--calib-seqlen", "64", "--ratio", "0.2" }),
        new("convert", ".out.tmp-", (model, dest, _) => new[] { "convert", "--model", model, "--out", Path.Combine(dest, "out"), "--to", "float16" }),
        new("export gguf", ".out.gguf.tmp-", (model, dest, _) => new[] { "export", "gguf", "--model", model, "--out", Path.Combine(dest, "out.gguf") }),
        // compare writes each row's pruned checkpoint under TMPDIR, then its report into --out.
        new("compare", "llmsnp-compare-", (model, dest, _) => new[] { "compare", "--model", model, "--out", Path.Combine(dest, "cmp"), "--methods", "magnitude",
            "--ratios", "0.2", "--targets", "mlp", "--calib", "tinystories", "--calib-samples", "4", "--calib-seqlen", "64",
            "--eval", "tinystories", "--eval-seqlen", "64", "--eval-limit", "2", "--no-speed" }),
        new("eval ppl --json", ".r.json.tmp-", (model, dest, _) => new[] { "eval", "ppl", "--model", model, "--dataset", "tinystories", "--seqlen", "64",
            "--max-windows", "2", "--json", Path.Combine(dest, "r.json") }),
        new("generate --json", ".r.json.tmp-", (model, dest, _) => new[] { "generate", "--model", model, "--prompt", "Once", "--max-new-tokens", "4",
            "--json", Path.Combine(dest, "r.json") }),
        // bench writes a random checkpoint into --work-dir before measuring it.
        new("bench", "llmsnp-bench-", (_, dest, work) => new[] { "bench", "--shape", "125m", "--layers", "1", "--skip-eval", "--skip-prune",
            "--work-dir", work, "--json", Path.Combine(dest, "bench.json") }),
    };

    [Fact]
    public void Every_stop_signal_on_every_command_that_writes_removes_its_output_and_the_runtime_files_with_one_line()
    {
        var sw = Stopwatch.StartNew();
        string model = StoriesCopy("model");
        var before = CliHarness.Snapshot(model);
        var cases = Writers.SelectMany(w => StopSignals.Select(s => (Writer: w, Signal: s))).Select((c, i) => (c.Writer, c.Signal, Index: i)).ToList();
        var lines = new string[cases.Count];
        // Child processes only (no tensor work in this process): three at a time.
        Parallel.ForEach(cases, new ParallelOptions { MaxDegreeOfParallelism = 3 }, c =>
        {
            string root = _tmp.Sub($"case-{c.Index}"), dest = Path.Combine(root, "dest"), tmp = Path.Combine(root, "tmp"), work = Path.Combine(root, "work");
            foreach (var d in new[] { dest, tmp, work }) Directory.CreateDirectory(d);
            string marker = Path.Combine(root, "stalled");
            var env = WriteShim.Stall(c.Writer.StagedUnder, marker);
            env["TMPDIR"] = tmp;
            var r = CliHarness.SignalledRun(c.Writer.Args(model, dest, work), $"[ -e '{marker}' ]", c.Signal.Number, env);
            string what = $"{c.Writer.Name}, {c.Signal.Name}";
            Assert.True(File.Exists(marker), $"{what}: the run never reached its staged write\n{r}");
            Assert.True(r.ExitCode == 128 + c.Signal.Number, $"{what}: exit {r.ExitCode}\n{r}");
            var errors = r.StderrLines.Where(l => l.StartsWith("error: ")).ToList();
            Assert.True(errors.Count == 1 && errors[0] == r.StderrLines[^1], $"{what}: expected one error line, the last\n{r}");
            Assert.StartsWith($"error: interrupted by {c.Signal.Name}; removed the unfinished output ", errors[0]);
            Assert.DoesNotContain("   at ", r.Stderr);
            Assert.True(Directory.GetFileSystemEntries(dest).Length == 0, $"{what}: left [{string.Join(", ", CliHarness.Siblings(dest, ""))}]\n{r}");
            Assert.True(Directory.GetFileSystemEntries(work).Length == 0, $"{what}: left [{string.Join(", ", CliHarness.Siblings(work, ""))}] in --work-dir\n{r}");
            // Nothing in TMPDIR either: no scratch output, no runtime debugger pipe or diagnostics socket.
            Assert.True(Directory.GetFileSystemEntries(tmp).Length == 0, $"{what}: left [{string.Join(", ", CliHarness.Siblings(tmp, ""))}] in TMPDIR\n{r}");
            lines[c.Index] = $"{what}: {errors[0]}";
        });
        foreach (var l in lines) _out.WriteLine(l);
        CliHarness.AssertSameSnapshot(before, model, "input model");
        _out.WriteLine($"{cases.Count} runs in {sw.Elapsed.TotalSeconds:F1} s");
    }

    [Fact]
    public void Prune_killed_mid_write_leaves_no_output_and_the_input_untouched_and_a_later_run_cleans_up()
    {
        string model = new TinyOpt { Vocab = 50272, Hidden = 64, Heads = 4, Ffn = 256, Layers = 6, MaxPositions = 128 }.Write(_tmp.Sub("model"));
        var before = CliHarness.Snapshot(model);
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        string[] args = { "prune", "--model", model, "--out", outDir, "--calib", "wikitext2", "--calib-samples", "16", "--calib-seqlen", "64", "--ratio", "0.3" };
        // SIGKILL (nothing can clean up after it) at the first write into the staging directory, and at the tenth,
        // while the pruned blocks stream into it: both land mid-write, every time.
        foreach (int at in new[] { 1, 10 })
        {
            string marker = _tmp.Sub($"stalled-{at}");
            var r = CliHarness.SignalledRun(args, $"[ -e '{marker}' ]", 9, WriteShim.Stall(".out.tmp-", marker, at));
            Assert.True(File.Exists(marker), $"write {at} into the staging directory never came\n{r}");
            Assert.Equal(137, r.ExitCode);
            Assert.False(Directory.Exists(outDir), "the --out directory exists after the kill");
            CliHarness.AssertSameSnapshot(before, model, "input model");
            // What a kill leaves behind: one hidden staging sibling, never anything at the output path (the second
            // run removed the first's on its way in: its process was gone).
            var left = CliHarness.Siblings(parent, "out");
            Assert.True(left.Length == 1 && left[0].StartsWith(".out.tmp-"), $"left behind: [{string.Join(", ", left)}]");
        }
        _out.WriteLine("left behind: " + string.Join(", ", CliHarness.Siblings(parent, "out")));

        // The next run removes them (their process is gone), says so, and writes a complete output.
        var ok = CliHarness.SucceedsJson(CliHarness.Run(args.Concat(new[] { "--ordering", "variance" }).ToArray()));
        Assert.Equal(outDir, ok["output"]!.GetValue<string>());
        using (var m = new OptModel(outDir)) Assert.Equal(6, m.BlockCount);
        Assert.Empty(CliHarness.Siblings(parent, "out"));
        CliHarness.AssertSameSnapshot(before, model, "input model after a full run");
    }

    [Fact]
    public void A_later_prune_removes_stale_staging_directories_of_dead_runs_only_and_says_so()
    {
        string model = new TinyOpt { Vocab = 50272, Hidden = 32, Heads = 4, Ffn = 64, Layers = 2, MaxPositions = 64 }.Write(_tmp.Sub("model"));
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        int deadPid;
        using (var dead = Process.Start(new ProcessStartInfo("true") { UseShellExecute = false })!) { dead.WaitForExit(); deadPid = dead.Id; }
        Assert.False(Directory.Exists($"/proc/{deadPid}"));
        string stale = Path.Combine(parent, $".out.tmp-{deadPid}-0123456789abcdef");
        string staleFile = Path.Combine(parent, $".out.tmp-{deadPid}-fedcba9876543210");                // an atomic file's temporary
        string live = Path.Combine(parent, $".out.tmp-{Environment.ProcessId}-fedcba9876543210");   // this test process is alive
        string legacy = Path.Combine(parent, ".out.tmp-0123456789abcdef0123456789abcdef");         // no pid: cannot tell
        foreach (var d in new[] { stale, live, legacy }) { Directory.CreateDirectory(d); File.WriteAllText(Path.Combine(d, "model.safetensors"), "partial"); }
        File.WriteAllText(staleFile, "partial");

        var r = CliHarness.Run(new[] { "prune", "--model", model, "--out", outDir, "--ratio", "0.25", "--calib", "wikitext2", "--calib-samples", "16", "--calib-seqlen", "32" });
        CliHarness.Succeeds(r);
        Assert.False(Directory.Exists(stale), "the dead run's directory was kept");
        Assert.False(File.Exists(staleFile), "the dead run's file was kept");
        Assert.True(Directory.Exists(live), "a live process's directory was removed");
        Assert.True(Directory.Exists(legacy), "a directory of unknown owner was removed");
        Assert.Contains(r.StderrLines, l => l.Contains(stale) && l.Contains($"process {deadPid}"));
        Assert.True(File.Exists(Path.Combine(outDir, "model.safetensors")));
    }

    // ---------------------------------------------------------------- resource limits

    static string Launcher => Path.Combine(Repo.Root, "llmsnp");

    /// <summary>The launcher script with a limit set before it (a bash prelude), its environment as a user's.</summary>
    static CliHarness.Result RunLauncher(string prelude, params string[] args)
    {
        var psi = new ProcessStartInfo("bash") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false, WorkingDirectory = Repo.Root };
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add(prelude + "; exec \"$0\" \"$@\"");
        psi.ArgumentList.Add(Launcher);
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.Environment["MKL_NUM_THREADS"] = psi.Environment["OMP_NUM_THREADS"] = "1";
        psi.Environment.Remove("DOTNET_EnableWriteXorExecute");
        psi.Environment.Remove("DOTNET_EnableDiagnostics");
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        Assert.True(p.WaitForExit(TimeSpan.FromSeconds(180)), $"llmsnp {string.Join(' ', args)} under '{prelude}' ran past 180 s");
        p.WaitForExit();
        return new CliHarness.Result(p.ExitCode, stdout.Result, stderr.Result, $"{prelude}; llmsnp {string.Join(' ', args)}");
    }

    /// <summary>
    /// Each limit a run can meet gives one line naming it and what to raise, exit 1, and no output: a file-size limit
    /// on each command that writes a checkpoint (the CLI ignores SIGXFSZ, so the write fails instead of the process
    /// dying), an address-space or descriptor limit past start-up, a CPU-time limit (SIGXCPU); and where the runtime
    /// itself could not start, the launcher says the one line instead of a GC, CoreCLR or assembly-load message.
    /// </summary>
    [Fact]
    public void Every_resource_limit_is_one_line_naming_it_and_what_to_raise()
    {
        string model = StoriesCopy("model");
        var before = CliHarness.Snapshot(model);
        string dest = _tmp.Sub("dest");
        Directory.CreateDirectory(dest);
        // W^X maps code through a file a file-size limit truncates: the runtime needs it off (the launcher does that itself).
        var noWx = new Dictionary<string, string> { ["DOTNET_EnableWriteXorExecute"] = "0" };
        string work = _tmp.Sub("work");
        Directory.CreateDirectory(work);
        string[] prune = { "prune", "--model", model, "--out", Path.Combine(dest, "out"), "--calib", "tinystories", "--calib-samples", "16", "--calib-seqlen", "64", "--ratio", "0.2" };
        var cases = new (string Prelude, string[] Args, Dictionary<string, string>? Env, string[] Mentions)[]
        {
            ("ulimit -f 100", new[] { "export", "gguf", "--model", model, "--out", Path.Combine(dest, "out.gguf"), "--dtype", "f32" }, noWx, new[] { "ulimit -f", "100 KiB", "raise it" }),
            ("ulimit -f 100", new[] { "convert", "--model", model, "--out", Path.Combine(dest, "out"), "--to", "float32" }, noWx, new[] { "ulimit -f", "100 KiB" }),
            ("ulimit -f 100", prune, noWx, new[] { "ulimit -f", "100 KiB", "file too large" }),
            // Start-up fits in ~3.2 GB of address space; a random 1.3B-shaped block and its GEMM need more.
            ("ulimit -v 3600000", new[] { "bench", "--shape", "1.3b", "--layers", "1", "--skip-eval", "--skip-prune", "--work-dir", work }, null, new[] { "ulimit -v", "3600000 KiB", "raise it" }),
            ("ulimit -n 40", new[] { "inspect", "--model", model }, null, new[] { "ulimit -n", "is 40", "raise it" }),
        };
        foreach (var (prelude, args, env, mentions) in cases)
        {
            var r = CliHarness.Run(args, bashPrelude: prelude, env: env);
            _out.WriteLine($"{prelude}; {args[0]}: {CliHarness.FailsWithOneLine(r, onlyLine: false, 1, mentions)}");
            Assert.Empty(Directory.GetFileSystemEntries(dest));
            Assert.Empty(Directory.GetFileSystemEntries(work));
        }

        // SIGXCPU at a soft CPU-time limit: the run stops with the limit named and its output removed.
        // Enough work to pass 2 s of CPU time on any machine: a larger calibration and a dense and pruned evaluation.
        var x = CliHarness.Run(prune.Select(a => a == "16" ? "256" : a).Concat(new[] { "--eval", "tinystories", "--eval-seqlen", "512" }).ToArray(), bashPrelude: "ulimit -St 2");
        Assert.Equal(128 + 24, x.ExitCode);
        Assert.Contains("the CPU-time limit (ulimit -t) of 2 s was reached", x.StderrLines[^1]);
        _out.WriteLine($"ulimit -St 2; prune: {x.StderrLines[^1]}");
        Assert.Empty(Directory.GetFileSystemEntries(dest));

        // The launcher: a limit under which the runtime cannot start is one line from the script; under a
        // file-size limit it turns W^X off, so the CLI starts and names the limit when a write passes it.
        foreach (var (prelude, mention) in new[] { ("ulimit -v 2000000", "ulimit -v"), ("ulimit -n 64", "ulimit -n") })
        {
            var r = RunLauncher(prelude, "inspect", "--model", model);
            _out.WriteLine($"{prelude}; llmsnp inspect: {CliHarness.FailsWithOneLine(r, onlyLine: true, 1, mention, "raise it")}");
        }
        var f = RunLauncher("ulimit -f 100", "export", "gguf", "--model", model, "--out", Path.Combine(dest, "out.gguf"), "--dtype", "f32");
        _out.WriteLine($"ulimit -f 100; llmsnp export gguf: {CliHarness.FailsWithOneLine(f, onlyLine: true, 1, "ulimit -f", "100 KiB")}");
        Assert.Empty(Directory.GetFileSystemEntries(dest));
        CliHarness.AssertSameSnapshot(before, model, "input model");
    }

    // ---------------------------------------------------------------- a full disk

    /// <summary>A full disk without mounting anything: the write shim fails regular-file writes with ENOSPC after 1 MB, in the child only.</summary>
    [Fact]
    public void Prune_onto_a_full_disk_fails_cleanly_and_leaves_nothing()
    {
        string model = CliRuns.SmallOpt.Write(_tmp.Sub("model"));
        var before = CliHarness.Snapshot(model);
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        var r = CliHarness.Run(CliRuns.PruneArgs(model, outDir, "--ratio", "0.25"), env: WriteShim.DiskFull(1 << 20));
        string line = CliRuns.FailsWithOneLine(r, onlyLine: false, outDir);
        _out.WriteLine(line);
        Assert.Contains("No space left on device", line);
        Assert.False(Directory.Exists(outDir));
        Assert.Empty(CliHarness.Siblings(parent, "out"));   // the staging directory was removed
        CliHarness.AssertSameSnapshot(before, model, "input model");
    }
}
