using System.CommandLine;
using System.Diagnostics;
using LlmSnp.Checkpoint;
using Xunit.Abstractions;
using static LlmSnp.Tests.CliRuns;

namespace LlmSnp.Tests;

/// <summary>
/// Every output path goes through one check before any work starts: never an input (the model directory or its files,
/// a dataset, a bundled model), never inside one, never over a device, FIFO or a symbolic link to one, never under a
/// file or where nothing can be created, and an existing directory is replaced only with --force.
/// </summary>
[Collection("Console")]
public sealed class OutputDestinationTests : IDisposable
{
    readonly ITestOutputHelper _out;
    readonly TempDir _tmp = new();
    public OutputDestinationTests(ITestOutputHelper o) { _out = o; }
    public void Dispose() => _tmp.Dispose();

    /// <summary>The command's words (e.g. "export gguf") from the root down.</summary>
    static List<string> Words(Command root, Command cmd)
    {
        var path = new List<string>();
        for (Command? c = cmd; c != null && c != root; c = c.Parents.OfType<Command>().FirstOrDefault()) path.Insert(0, c.Name);
        return path;
    }

    /// <summary>A value that lets an option parse, so that the destination check (before any work) is what answers.</summary>
    static string Placeholder(Option o, string model, Func<string, string> fresh) => o.Name switch
    {
        "--model" => model,
        "--prompt" or "--text" => "Once",
        "--tasks" => "piqa",
        "--images" => Path.Combine(Repo.Root, "eval", "data", "imagenet-val"),
        "--out" => fresh("out"),
        _ => "x",
    };

    /// <summary>
    /// Each output option of each command (found in the command tree, so a new command is covered the day it is
    /// added), pointed at an input of the run, inside one, at a character device and at a symbolic link to one:
    /// one line naming the option, exit 1, nothing ran, and the input, the device and the link are as they were.
    /// </summary>
    [Fact]
    public void Every_output_option_of_every_command_refuses_inputs_devices_and_links_to_devices()
    {
        var root = OptionChecks.Apply(Cli.Build());
        string model = _tmp.Sub("model");
        Directory.CreateDirectory(model);
        foreach (var f in Directory.GetFiles(Path.Combine(Repo.Root, "models", "stories260k"))) File.Copy(f, Path.Combine(model, Path.GetFileName(f)));
        var before = Snapshot(model);
        string bundled = Path.Combine(Repo.Root, "models", "stories260k");
        var bundledBefore = Snapshot(bundled);
        string link = _tmp.Sub("link-to-null");
        File.CreateSymbolicLink(link, "/dev/null");
        string fifo = _tmp.Sub("fifo");
        using (var mk = Process.Start("mkfifo", fifo)!) { mk.WaitForExit(); Assert.Equal(0, mk.ExitCode); }

        var cases = new List<(string[] Args, string Option, string Hazard)>();
        var pairs = new List<string>();
        int n = 0;
        foreach (var cmd in OptionChecks.AllCommands(root).Where(c => c.Action != null))
            foreach (var o in cmd.Options)
            {
                if (OptionChecks.DestinationOf(cmd, o) is not DestinationKind kind) continue;
                bool hasModel = cmd.Options.Any(x => x.Name == "--model");
                pairs.Add($"{string.Join(' ', Words(root, cmd))} {o.Name}");
                var hazards = new List<(string Path, string What)> { ("/dev/null", "a character device"), (link, "a link to a character device") };
                if (kind == DestinationKind.File) hazards.Add((fifo, "a FIFO"));
                if (hasModel)
                {
                    if (kind == DestinationKind.File) { hazards.Add((Path.Combine(model, "model.safetensors"), "the model's weights")); hazards.Add((Path.Combine(model, "config.json"), "the model's config")); }
                    else { hazards.Add((model, "the model directory")); hazards.Add((Path.Combine(model, "sub"), "inside the model directory")); }
                }
                else if (cmd.Name == "demo") hazards.Add((bundled, "a bundled model"));
                foreach (var (path, what) in hazards)
                {
                    int id = n++;
                    var args = Words(root, cmd);
                    foreach (var other in cmd.Options.Where(x => x != o && (x.Required || x.Name == "--model")))
                        args.AddRange(new[] { other.Name, Placeholder(other, model, name => _tmp.Sub($"case-{id}-{name}")) });
                    args.AddRange(new[] { o.Name, path });
                    cases.Add((args.ToArray(), o.Name, what));
                }
            }
        var lines = new string[cases.Count];
        Parallel.For(0, cases.Count, new ParallelOptions { MaxDegreeOfParallelism = 3 }, i =>
        {
            var (args, option, what) = cases[i];
            var r = CliHarness.Run(args, timeoutSeconds: 120);
            string line = CliHarness.FailsWithOneLine(r, onlyLine: true, 1);
            Assert.True(line.StartsWith($"error: {option} "), $"{what}: the line should name {option}\n{r}");
            lines[i] = $"{what,-28} {string.Join(' ', args.TakeWhile(a => !a.StartsWith("--")))} {option}: {line}";
        });
        foreach (var l in lines) _out.WriteLine(l);
        _out.WriteLine($"{cases.Count} cases over {pairs.Count} output options: {string.Join(", ", pairs)}");
        AssertSameSnapshot(before, model, "input model");
        AssertSameSnapshot(bundledBefore, bundled, "bundled model");
        Assert.Equal(FileNodeKind.CharacterDevice, FileNodes.Kind("/dev/null"));
        Assert.Equal(FileNodeKind.SymbolicLink, FileNodes.Kind(link));
        Assert.Equal(FileNodeKind.Fifo, FileNodes.Kind(fifo));
        // The commands that write: prune, convert, export gguf, compare, eval tasks --log-samples, bench, demo, and --json everywhere.
        foreach (var must in new[] { "prune --out", "convert --out", "export gguf --out", "compare --out", "eval tasks --log-samples", "bench --work-dir", "demo --out", "inspect --json", "generate --json" })
            Assert.Contains(must, pairs);
    }

    /// <summary>The same through symbolic links and "..": the output is compared with the inputs by identity, not by spelling.</summary>
    [Fact]
    public void An_input_reached_through_a_link_or_dot_dot_is_still_an_input()
    {
        string model = SmallOpt.Write(_tmp.Sub("model"));
        var before = Snapshot(model);
        string alias = _tmp.Sub("alias");
        Directory.CreateSymbolicLink(alias, model);
        var cases = new (string[] Args, string Option)[]
        {
            (new[] { "export", "gguf", "--model", model, "--out", Path.Combine(alias, "model.safetensors") }, "--out"),
            (new[] { "inspect", "--model", alias, "--json", Path.Combine(model, "config.json") }, "--json"),
            (new[] { "inspect", "--model", model, "--json", Path.Combine(model, "..", "model", "config.json") }, "--json"),
            (new[] { "convert", "--model", alias, "--out", model, "--to", "float16" }, "--out"),
            (new[] { "prune", "--model", model, "--out", Path.Combine(alias, "pruned") }.Concat(QuickCalib).ToArray(), "--out"),
            (new[] { "eval", "ppl", "--model", model, "--dataset", Path.Combine(model, "config.json"), "--json", Path.Combine(alias, "config.json") }, "--json"),
        };
        foreach (var (args, option) in cases)
            _out.WriteLine(CliHarness.FailsWithOneLine(CliHarness.Run(args, timeoutSeconds: 60), onlyLine: true, 1, option));
        AssertSameSnapshot(before, model, "input model");
    }

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
}
