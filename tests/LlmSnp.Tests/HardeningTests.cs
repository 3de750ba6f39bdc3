using System.CommandLine;
using System.Diagnostics;
using LlmSnp.Checkpoint;
using LlmSnp.Data.Images;
using Xunit.Abstractions;

namespace LlmSnp.Tests;

/// <summary>
/// Issue 17's classes of failure, one test each: out-of-range numbers, destinations checked before
/// work, SIGINT/SIGTERM/SIGXFSZ, stale staging directories of killed runs, class ids the model lacks.
/// </summary>
[Collection("Console")]
public sealed class HardeningTests : IDisposable
{
    readonly ITestOutputHelper _out;
    readonly TempDir _tmp = new();
    public HardeningTests(ITestOutputHelper o) { _out = o; }
    public void Dispose() => _tmp.Dispose();

    static TinyOpt SmallOpt => new() { Vocab = 50272, Hidden = 32, Heads = 4, Ffn = 64, Layers = 2, MaxPositions = 64 };
    static readonly string[] QuickCalib = { "--calib", "wikitext2", "--calib-samples", "16", "--calib-seqlen", "32" };

    static string[] Siblings(string parent, string name) =>
        Directory.GetFileSystemEntries(parent).Select(Path.GetFileName).Where(n => n != name).Select(n => n!).Order(StringComparer.Ordinal).ToArray();

    // ---------------------------------------------------------------- numeric options

    /// <summary>Command path, then its required options filled with placeholders (parsing only: nothing runs).</summary>
    static List<string> Invocation(Command root, Command cmd)
    {
        var path = new List<string>();
        for (Command? c = cmd; c != null && c != root; c = c.Parents.OfType<Command>().FirstOrDefault()) path.Insert(0, c.Name);
        foreach (var o in cmd.Options.Where(o => o.Required)) { path.Add(o.Name); path.Add("x"); }
        return path;
    }

    [Fact]
    public void Every_numeric_option_of_every_command_is_range_checked_with_one_line_naming_it()
    {
        var root = OptionChecks.Apply(Cli.Build());
        int checkedOptions = 0;
        foreach (var cmd in OptionChecks.AllCommands(root))
            foreach (var o in cmd.Options.Where(OptionChecks.IsNumeric))
            {
                var rule = OptionChecks.Rules[o.Name];
                var bad = new List<string> { "x1", "1e400" };
                if (rule.Integer) bad.AddRange(new[] { (rule.Min - 1).ToString(), "2.5", rule.Max < int.MaxValue ? (rule.Max + 1).ToString() : "99999999999" });
                else bad.AddRange(new[] { "nan", "inf", "-inf", (rule.MinOpen ? rule.Min : rule.Min - 0.5).ToString("R", System.Globalization.CultureInfo.InvariantCulture),
                    (rule.MaxOpen ? rule.Max : rule.Max + 0.5).ToString("R", System.Globalization.CultureInfo.InvariantCulture) });
                var good = new List<string> { rule.Integer ? Math.Min(rule.Max, rule.Min + 1).ToString() : "0.5" };
                if (!rule.MinOpen) good.Add(rule.Min.ToString(System.Globalization.CultureInfo.InvariantCulture));
                foreach (var v in bad)
                {
                    var args = Invocation(root, cmd).Concat(new[] { o.Name, v }).ToArray();
                    var p = root.Parse(args);
                    Assert.True(p.Errors.Count > 0, $"llmsnp {string.Join(' ', args)} parsed without error");
                    string m = OptionChecks.Message(p.Errors);
                    Assert.True(m.StartsWith(o.Name + ":"), $"llmsnp {string.Join(' ', args)}: '{m}' does not start with the option");
                    Assert.DoesNotContain("\n", m);
                }
                foreach (var v in good)
                {
                    var args = Invocation(root, cmd).Concat(new[] { o.Name, v }).ToArray();
                    var p = root.Parse(args);
                    Assert.True(p.Errors.Count == 0, $"llmsnp {string.Join(' ', args)}: {string.Join("; ", p.Errors.Select(e => e.Message))}");
                }
                checkedOptions++;
            }
        _out.WriteLine($"{checkedOptions} numeric options checked");
        Assert.True(checkedOptions >= 25, $"only {checkedOptions} numeric options found");

        // As a user meets them: exit 1 and one line (these were exit 70, a hang, or two lines).
        string vit = Path.Combine("models", "vit-tiny"), opt = Path.Combine("models", "opt-tiny-c4-v2");
        var cases = new (string[] Args, string Option)[]
        {
            (new[] { "eval", "accuracy", "--model", vit, "--images", "eval/data/imagenet-val", "--batch", "0" }, "--batch"),
            (new[] { "eval", "ppl", "--model", opt, "--max-windows", "-1" }, "--max-windows"),
            (new[] { "eval", "ppl", "--model", opt, "--seqlen", "abc" }, "--seqlen"),
            (new[] { "prune", "--model", opt, "--out", _tmp.Sub("o"), "--calib-samples", "2000000000" }, "--calib-samples"),
            (new[] { "prune", "--model", opt, "--out", _tmp.Sub("o"), "--calib-samples", "900000", "--calib-seqlen", "2048" }, "--calib-samples"),
            (new[] { "prune", "--model", opt, "--out", "" }, "--out"),
        };
        foreach (var (args, option) in cases)
        {
            var r = CliHarness.Run(args, timeoutSeconds: 60);
            _out.WriteLine(CliHarness.FailsWithOneLine(r, onlyLine: true, 1, option));
        }
    }

    // ---------------------------------------------------------------- destinations

    [Fact]
    public void Unwritable_destinations_fail_before_any_work_with_one_line()
    {
        string model = SmallOpt.Write(_tmp.Sub("model"));
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        string aFile = _tmp.Sub("a-file");
        File.WriteAllText(aFile, "not a directory");
        string existing = _tmp.Sub("existing");
        Directory.CreateDirectory(existing);
        string[] Prune(params string[] extra) => new[] { "prune", "--model", model, "--out", outDir, "--ratio", "0.25" }.Concat(QuickCalib).Concat(extra).ToArray();
        var cases = new (string[] Args, string Mention)[]
        {
            (Prune("--json", "/proc/llmsnp-report.json"), "--json"),           // the file system refuses it
            (Prune("--json", Path.Combine(aFile, "r.json")), "--json"),        // under a regular file
            (Prune("--json", Path.Combine(_tmp.Sub("missing"), "r.json")), "--json"),
            (Prune("--json", existing), "--json"),                             // a directory
            (new[] { "prune", "--model", model, "--out", existing }.Concat(QuickCalib).ToArray(), "--force"),
            (new[] { "prune", "--model", model, "--out", Path.Combine(model, "pruned") }.Concat(QuickCalib).ToArray(), "model directory"),
            (new[] { "prune", "--model", model, "--out", Path.Combine(aFile, "out") }.Concat(QuickCalib).ToArray(), aFile),
            (new[] { "inspect", "--model", model, "--json", "/proc/x.json" }, "--json"),
            (new[] { "convert", "--model", model, "--out", existing, "--to", "float16" }, "already exists"),
            (new[] { "compare", "--model", model, "--out", Path.Combine(aFile, "cmp") }, aFile),
        };
        foreach (var (args, mention) in cases)
        {
            var sw = Stopwatch.StartNew();
            var r = CliHarness.Run(args, timeoutSeconds: 60);
            // onlyLine: no calibration or block progress came first, so nothing ran.
            _out.WriteLine($"{sw.Elapsed.TotalSeconds:F1}s {CliHarness.FailsWithOneLine(r, onlyLine: true, 1, mention)}");
            Assert.False(Directory.Exists(outDir), r.ToString());
            Assert.Empty(Siblings(parent, "out"));
        }
        Assert.Equal("not a directory", File.ReadAllText(aFile));
        Assert.Empty(Directory.GetFileSystemEntries(existing));   // no probe file left behind
    }

    // ---------------------------------------------------------------- signals and limits

    const int SIGINT = 2, SIGTERM = 15;

    [Theory]
    [InlineData(SIGTERM, 143, "SIGTERM")]
    [InlineData(SIGINT, 130, "SIGINT")]
    public void Prune_interrupted_by_a_signal_ends_with_one_line_and_removes_its_temporary_directory(int signal, int exit, string name)
    {
        string model = new TinyOpt { Vocab = 50272, Hidden = 64, Heads = 4, Ffn = 256, Layers = 6, MaxPositions = 128 }.Write(_tmp.Sub("model"));
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        string[] args = { "prune", "--model", model, "--out", outDir, "--calib", "wikitext2", "--calib-samples", "1024", "--calib-seqlen", "64", "--ratio", "0.3" };
        var r = SignalledRun(args, $"ls -a '{parent}' | grep -q '^\\.out\\.tmp-'", 0.3, signal);
        string line = CliHarness.FailsWithOneLine(r, onlyLine: false, exit, name);
        _out.WriteLine(line);
        Assert.False(Directory.Exists(outDir));
        Assert.Empty(Siblings(parent, "out"));
    }

    [Fact]
    public void Compare_interrupted_while_a_row_is_timed_removes_the_rows_checkpoint_and_its_gguf()
    {
        // A private TMPDIR: compare writes each row's pruned model there, and the timing its GGUF.
        string tmp = _tmp.Sub("tmpdir");
        Directory.CreateDirectory(tmp);
        string[] args = { "compare", "--model", Path.Combine(Repo.Root, "models", "stories260k"), "--out", _tmp.Sub("cmp"), "--methods", "magnitude",
            "--ratios", "0.1,0.2,0.3,0.4,0.5", "--targets", "mlp", "--calib", "tinystories", "--calib-samples", "4", "--calib-seqlen", "64",
            "--eval", "tinystories", "--eval-seqlen", "64", "--eval-limit", "4" };
        // Signalled as soon as a row's checkpoint is published there (its timing follows at once).
        var r = SignalledRun(args, $"ls '{tmp}' | grep -q '^llmsnp-compare-'", 0.0, SIGTERM, new Dictionary<string, string> { ["TMPDIR"] = tmp });
        _out.WriteLine(CliHarness.FailsWithOneLine(r, onlyLine: false, 143, "SIGTERM"));
        Assert.DoesNotContain(Directory.GetFileSystemEntries(tmp).Select(Path.GetFileName), n => n!.Contains("llmsnp-"));
    }

    /// <summary>
    /// bash starts the CLI, waits until <paramref name="ready"/> (a shell condition) holds, lets it work for
    /// <paramref name="after"/> s, signals it by pid and reports its exit status (the shell, not this test
    /// host, is its parent). set -m: a background job of a non-interactive shell would otherwise start with
    /// SIGINT ignored, and an ignored signal stays ignored across exec (bash cannot undo it): python3
    /// restores the default disposition before exec'ing the CLI.
    /// </summary>
    static CliHarness.Result SignalledRun(string[] args, string ready, double after, int signal, IDictionary<string, string>? env = null)
    {
        string script = "set -m; python3 -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \"$0\" \"$@\" & pid=$!; " +
                        $" for i in $(seq 1 1200); do {ready} && break; sleep 0.05; done; " +
                        $"sleep {after.ToString(System.Globalization.CultureInfo.InvariantCulture)}; kill -{signal} $pid; wait $pid; echo \"exit=$?\" >&2";
        var psi = CliHarness.Psi(args, env: env);
        psi.ArgumentList.Insert(0, psi.FileName);
        psi.ArgumentList.Insert(0, script);
        psi.ArgumentList.Insert(0, "-c");
        psi.FileName = "bash";
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEndAsync();
        p.WaitForExit();
        string err = stderr.Result;
        var lines = err.TrimEnd('\n').Split('\n');
        Assert.True(lines[^1].StartsWith("exit="), err);   // (job-control notices, "[1]+ Exit ...", are the shell's, not the CLI's)
        return new CliHarness.Result(int.Parse(lines[^1]["exit=".Length..]), stdout.Result, string.Join('\n', lines[..^1].Where(l => !l.StartsWith("[1]"))) + "\n", "llmsnp " + string.Join(' ', args));
    }

    [Fact]
    public void Prune_past_the_file_size_limit_fails_with_one_line_without_a_trap()
    {
        // No `trap '' XFSZ` here: the process itself ignores SIGXFSZ, so the write fails (EFBIG)
        // instead of the signal killing it silently. (W^X double mapping needs an unlimited file size.)
        string model = SmallOpt.Write(_tmp.Sub("model"));
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        var r = CliHarness.Run(new[] { "prune", "--model", model, "--out", outDir, "--ratio", "0.25" }.Concat(QuickCalib).ToArray(),
            bashPrelude: "ulimit -f 1024", env: new Dictionary<string, string> { ["DOTNET_EnableWriteXorExecute"] = "0" });
        string line = CliHarness.FailsWithOneLine(r, onlyLine: false, 1, outDir);
        _out.WriteLine(line);
        Assert.Contains("too large", line);   // EFBIG, in .NET's words
        Assert.False(Directory.Exists(outDir));
        Assert.Empty(Siblings(parent, "out"));
    }

    [Fact]
    public void A_later_prune_removes_stale_temporary_directories_of_dead_runs_only_and_says_so()
    {
        string model = SmallOpt.Write(_tmp.Sub("model"));
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        int deadPid;
        using (var dead = Process.Start(new ProcessStartInfo("true") { UseShellExecute = false })!) { dead.WaitForExit(); deadPid = dead.Id; }
        Assert.False(Directory.Exists($"/proc/{deadPid}"));
        string stale = Path.Combine(parent, $".out.tmp-{deadPid}-0123456789abcdef");
        string live = Path.Combine(parent, $".out.tmp-{Environment.ProcessId}-fedcba9876543210");   // this test process is alive
        string legacy = Path.Combine(parent, ".out.tmp-0123456789abcdef0123456789abcdef");         // no pid: cannot tell
        foreach (var d in new[] { stale, live, legacy }) { Directory.CreateDirectory(d); File.WriteAllText(Path.Combine(d, "model.safetensors"), "partial"); }

        var r = CliHarness.Run(new[] { "prune", "--model", model, "--out", outDir, "--ratio", "0.25" }.Concat(QuickCalib).ToArray());
        CliHarness.Succeeds(r);
        Assert.False(Directory.Exists(stale), "the dead run's directory was kept");
        Assert.True(Directory.Exists(live), "a live process's directory was removed");
        Assert.True(Directory.Exists(legacy), "a directory of unknown owner was removed");
        Assert.Contains(r.StderrLines, l => l.Contains(stale) && l.Contains($"process {deadPid}"));
        Assert.True(File.Exists(Path.Combine(outDir, "model.safetensors")));
    }

    // ---------------------------------------------------------------- labels

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
