using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp;
using LlmSnp.Checkpoint;

// The CLI only parses options, calls the library and prints: JSON results on stdout (and --json FILE),
// progress and errors on stderr, one line per error, never a stack trace. One file per command.
// A failure in another thread, or before the first command runs (libtorch not loading under a small `ulimit -v`,
// an assembly under a small `ulimit -n`), is one line too: never the runtime's stack trace and abort. Main itself
// names no System.CommandLine type, so that an assembly that cannot be loaded fails inside the try.
AppDomain.CurrentDomain.UnhandledException += (_, e) => Failure.ExitNow(Failure.Report(e.ExceptionObject as Exception ?? new Exception("unknown")));
try { return Cli.Start(args); }
catch (Exception e) { return Failure.Report(e); }

/// <summary>The command tree, the options every command shares, and how a command's result or failure is printed.</summary>
static class Cli
{
    static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static Option<string> ModelOption() => new("--model") { Description = "checkpoint directory in HF layout", Required = true };
    public static readonly Option<string> Device = new("--device") { Description = "cpu or cuda", DefaultValueFactory = _ => "cpu" };
    public static readonly Option<string?> DType = new("--dtype") { Description = "compute dtype: float32 (default), bfloat16, float64" };
    public static readonly Option<string?> Json = new("--json") { Description = "also write the JSON result to this file" };

    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.NoInlining)]
    public static int Start(string[] args)
    {
        Runtime.ConfigureHostMemory();   // before any tensor op: libtorch reads its allocator settings once
        Runtime.ConfigureThreads();
        LlmSnp.Models.ModelFamilies.Warn = Log;   // unused stored tensors: one warning line on stderr
        using var signals = Signals.Install();
        return OptionChecks.Invoke(Build(), args);
    }

    public static RootCommand Build() => new("llmsnp: one-shot structured pruning of transformer checkpoints with Subspace Node Pruning")
    {
        EvalCommand.Build(),
        TokenizeCommand.Build(),
        InspectCommand.Build(),
        PruneCommand.Build(),
        DemoCommand.Build(Run),
        ConvertCommand.Build(),
        CompareCommand.Build(),
        BenchCommand.Build(),
        ExportCommand.Build(),
        GenerateCommand.Build(),
    };

    public static TorchSharp.torch.ScalarType ComputeDType(ParseResult p) =>
        p.GetValue(DType) is string s ? SafeDTypes.ParseOption(s) : TorchSharp.torch.ScalarType.Float32;

    public static TorchSharp.torch.Device ComputeDevice(ParseResult p) => Runtime.ParseDevice(p.GetValue(Device)!);

    public static void Log(string line) => Console.Error.WriteLine(line);

    /// <summary>Runs a command body: JSON to stdout (and --json FILE), one-line errors, exit codes.</summary>
    public static int Run(ParseResult p, Func<JsonObject> body)
    {
        try
        {
            var result = body();
            string text = result.ToJsonString(Indented);
            if (p.GetValue(Json) is string path) AtomicFile.WriteAllText(path, text + "\n");
            Console.Out.WriteLine(text);
            return 0;
        }
        catch (Exception e) { return Fail(e); }
    }

    /// <summary>One line on stderr and the exit code (<see cref="Failure.Report"/>).</summary>
    public static int Fail(Exception e) => Failure.Report(e);
}
