using System.CommandLine;
using System.CommandLine.Parsing;
using System.Globalization;
using LlmSnp;
using LlmSnp.Benchmarks;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Export;
using LlmSnp.Models;
using LlmSnp.Pruning;

[assembly: System.Runtime.CompilerServices.InternalsVisibleTo("LlmSnp.Tests")]

/// <summary>
/// Checks of every option, attached to the finished command tree by option name (an option means the same in
/// every command that has it; where it does not, "command --option" says which), so a command defined anywhere
/// gets them: a range for every numeric option, a parser for every option with a fixed vocabulary, and one
/// destination check for every output. A bad value is one line naming the option and exit 1, before anything runs.
/// </summary>
static class OptionChecks
{
    /// <summary>Allowed range of a numeric option; the bounds are inclusive unless marked open.</summary>
    public sealed record Rule(double Min, double Max, bool Integer, bool MinOpen = false, bool MaxOpen = false)
    {
        public string Describe() => Integer
            ? $"an integer from {Min} to {Max:0}"
            : $"a number in {(MinOpen ? "(" : "[")}{Min.ToString(CultureInfo.InvariantCulture)}, {Max.ToString(CultureInfo.InvariantCulture)}{(MaxOpen ? ")" : "]")}";

        public bool Allows(double v) => double.IsFinite(v) && (Integer ? v == Math.Floor(v) : true)
            && (MinOpen ? v > Min : v >= Min) && (MaxOpen ? v < Max : v <= Max);
    }

    /// <summary>Longest window any option may ask for (tokens); the model's own limit is checked when it is loaded.</summary>
    public const int MaxSeqLen = 1 << 20;
    /// <summary>Calibration windows × length: 2^27 tokens is 1 GiB of ids before any activation.</summary>
    public const long MaxCalibTokens = 1L << 27;

    static Rule Int(double min, double max) => new(min, max, Integer: true);

    public static readonly IReadOnlyDictionary<string, Rule> Rules = new Dictionary<string, Rule>(StringComparer.Ordinal)
    {
        // Windows need two tokens: one predicted from another.
        ["--seqlen"] = Int(2, MaxSeqLen), ["--llama-cpp-prefill"] = Int(1, MaxSeqLen), ["--calib-seqlen"] = Int(2, MaxSeqLen), ["--eval-seqlen"] = Int(2, MaxSeqLen),
        ["--calib-samples"] = Int(1, 1_000_000),
        ["--max-windows"] = Int(1, int.MaxValue), ["--eval-limit"] = Int(1, int.MaxValue), ["--limit"] = Int(1, int.MaxValue),
        ["--eval-windows"] = Int(1, int.MaxValue), ["--eval-images"] = Int(1, int.MaxValue),
        ["--batch"] = Int(1, 65536),
        ["--layers"] = Int(1, 4096),
        ["--width-multiple"] = Int(1, 65536),
        ["--cases"] = Int(1, 100_000_000),
        ["--seed"] = Int(0, int.MaxValue),
        ["--ratio"] = new(0, 1, false, MaxOpen: true), ["--budget"] = new(0, 1, false, MaxOpen: true),
        ["--variance"] = new(0, 1, false, MinOpen: true), ["--variance-opt"] = new(0, 1, false, MinOpen: true),
        ["--variance-vit"] = new(0, 1, false, MinOpen: true), ["--variance-llama"] = new(0, 1, false, MinOpen: true),
        ["--damp"] = new(0, 1e6, false),
        // generate: the model's max positions bound the tokens further when it is loaded.
        ["--max-new-tokens"] = Int(1, MaxSeqLen),
        ["--temperature"] = new(0, 100, false),
        ["--top-p"] = new(0, 1, false, MinOpen: true),
    };

    /// <summary>Options naming something the command reads: outputs must never reach them (<see cref="CheckDestinations"/>).</summary>
    public static readonly IReadOnlySet<string> InputOptions = new HashSet<string>(StringComparer.Ordinal)
    {
        "--model", "--images", "--file", "--dataset", "--calib", "--eval", "--tasks",
    };

    /// <summary>How a command writes each of its output options; null for an option that is not an output.</summary>
    public static DestinationKind? DestinationOf(Command cmd, Option o) => (cmd.Name, o.Name) switch
    {
        (_, "--json") or (_, "--log-samples") or ("gguf", "--out") => DestinationKind.File,
        ("prune", "--out") or ("convert", "--out") => DestinationKind.ReplacedDirectory,
        (_, "--out") or (_, "--work-dir") => DestinationKind.DirectoryWrittenInto,
        _ => null,
    };

    /// <summary>Options naming a file or directory: an empty value is refused where it is parsed.</summary>
    public static readonly IReadOnlySet<string> PathOptions = new HashSet<string>(InputOptions.Concat(new[] { "--out", "--json", "--work-dir", "--log-samples" }), StringComparer.Ordinal);

    /// <summary>Options whose value is free text (anything goes, the empty string included).</summary>
    public static readonly IReadOnlySet<string> FreeText = new HashSet<string>(StringComparer.Ordinal) { "--prompt", "--text" };

    /// <summary>
    /// The parser of every option with a fixed vocabulary, by "command --option" or "--option"; each throws a one-line
    /// LlmSnpException that starts with the option's name. The command body parses the value again with the same function.
    /// </summary>
    public static readonly IReadOnlyDictionary<string, Action<string>> Parsers = new Dictionary<string, Action<string>>(StringComparer.Ordinal)
    {
        ["--ordering"] = v => Orderings.Parse(v),
        ["--reconstruct"] = v => ReconstructModes.Parse(v),
        ["--dtype"] = v => SafeDTypes.ParseOption(v),
        ["gguf --dtype"] = v => GgufExport.ParseDType(v),
        ["--to"] = v => CheckpointConvert.ParseTarget(v),
        ["--device"] = v => Runtime.ParseDevice(v),
        ["--targets"] = v => NodeKinds.ParseSet(v, "--targets"),
        ["compare --targets"] = v => CompareCommand.ParseTargetSets(v),
        ["--methods"] = v => CompareCommand.ParseMethods(v),
        ["--ratios"] = v => CompareCommand.ParseRatios(v),
        ["--ids"] = v => EvalCommand.ParseIds(v),
        ["--shape"] = v => BenchShapes.Parse(v),
    };

    public static Action<string>? ParserOf(Command cmd, Option o) =>
        Parsers.TryGetValue($"{cmd.Name} {o.Name}", out var p) || Parsers.TryGetValue(o.Name, out p) ? p : null;

    public static bool IsNumeric(Option o)
    {
        var t = Nullable.GetUnderlyingType(o.ValueType) ?? o.ValueType;
        return t == typeof(int) || t == typeof(long) || t == typeof(double) || t == typeof(float) || t == typeof(decimal);
    }

    public static IEnumerable<Command> AllCommands(Command c) => new[] { c }.Concat(c.Subcommands.SelectMany(AllCommands));

    /// <summary>Attaches the checks to every option of the tree; a numeric option without a rule is a programming error.</summary>
    public static RootCommand Apply(RootCommand root)
    {
        foreach (var cmd in AllCommands(root))
        {
            foreach (var o in cmd.Options)
            {
                if (IsNumeric(o))
                {
                    if (!Rules.TryGetValue(o.Name, out var rule)) throw new InvalidOperationException($"{cmd.Name} {o.Name}: numeric option without a range rule in OptionChecks");
                    o.Validators.Add(r => { if (Check(o.Name, rule, r.Tokens) is string e) r.AddError(e); });
                }
                else if (PathOptions.Contains(o.Name))
                    o.Validators.Add(r => { if (r.Tokens.Any(t => string.IsNullOrWhiteSpace(t.Value))) r.AddError($"{o.Name}: empty path"); });
                else if (ParserOf(cmd, o) is Action<string> parse)
                    o.Validators.Add(r =>
                    {
                        foreach (var t in r.Tokens)
                        {
                            try { parse(t.Value); }
                            catch (LlmSnpException e) { r.AddError(e.Message); return; }
                        }
                    });
            }
            var samples = cmd.Options.FirstOrDefault(o => o.Name == "--calib-samples");
            var seqlen = cmd.Options.FirstOrDefault(o => o.Name is "--calib-seqlen" or "--seqlen");
            if (samples != null) cmd.Validators.Add(r => CheckCalibTokens(r, samples, seqlen));
        }
        return root;
    }

    /// <summary>null if the raw token is in range, else the one-line message.</summary>
    public static string? Check(string name, Rule rule, IReadOnlyList<Token> tokens)
    {
        foreach (var t in tokens)
        {
            string s = t.Value.Trim();
            double v;
            bool parsed;
            if (rule.Integer) { parsed = long.TryParse(s, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out long l); v = l; }
            else parsed = double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out v);
            if (!parsed) return $"{name}: '{t.Value}' is not {(rule.Integer ? "an integer" : "a number")} (expected {rule.Describe()})";
            if (!rule.Allows(v)) return $"{name}: {t.Value} is out of range (expected {rule.Describe()})";
        }
        return null;
    }

    static void CheckCalibTokens(CommandResult r, Option samples, Option? seqlen)
    {
        long n = Value(r, samples) ?? 0, l = (seqlen != null ? Value(r, seqlen) : null) ?? 2048;
        if (!Rules[samples.Name].Allows(n) || (seqlen != null && !Rules[seqlen.Name].Allows(l))) return;   // the option's own error says it
        if (n * l > MaxCalibTokens)
            r.AddError($"{samples.Name} {n} × {seqlen?.Name ?? "window length"} {l} = {n * l:N0} calibration tokens, more than the {MaxCalibTokens:N0} allowed");
    }

    static long? Value(CommandResult r, Option o) =>
        r.GetResult(o) is OptionResult or && or.Tokens.Count == 1
        && long.TryParse(or.Tokens[0].Value, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out long v) ? v : null;

    /// <summary>
    /// Parses; a parse error is one "error: " line and exit 1 (no help text); then the destinations are checked
    /// (<see cref="CheckDestinations"/>: here, so that no command can run without it), then the command runs.
    /// </summary>
    public static int Invoke(RootCommand root, string[] args)
    {
        var parsed = Apply(root).Parse(args);
        if (parsed.Errors.Count > 0)
        {
            Console.Error.WriteLine($"error: {Message(parsed.Errors)}");
            return 1;
        }
        if (parsed.Action != null && parsed.Action == parsed.CommandResult.Command.Action)   // not for --help
        {
            try { CheckDestinations(parsed); }
            catch (LlmSnpException e)
            {
                Console.Error.WriteLine($"error: {e.Message}");
                return 1;
            }
        }
        return parsed.Invoke();
    }

    /// <summary>The first error, our own wording where it concerns a ranged option (the parser's names CLR types).</summary>
    public static string Message(IReadOnlyList<ParseError> errors)
    {
        foreach (var e in errors)
            if (e.SymbolResult is OptionResult r && Rules.TryGetValue(r.Option.Name, out var rule) && Check(r.Option.Name, rule, r.Tokens) is string m) return m;
        return errors[0].Message.Split('\n')[0].Trim();
    }

    /// <summary>
    /// Before the command body: every output of the command (<see cref="DestinationOf"/>) must be writable, must not be
    /// or lie inside anything the command reads (<see cref="Inputs"/>), must not replace a device, FIFO, socket or
    /// symbolic link, and two outputs must not be the same path (Destinations.Check).
    /// </summary>
    public static void CheckDestinations(ParseResult p)
    {
        var cmd = p.CommandResult.Command;
        var inputs = Inputs(p);
        var seen = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var o in cmd.Options)
        {
            if (DestinationOf(cmd, o) is not DestinationKind kind || p.GetValue<string>(o.Name) is not string path) continue;
            string full = FileNodes.PhysicalPath(path);
            if (seen.TryGetValue(full, out var other)) throw new LlmSnpException($"{o.Name} {path}: is also {other}; two outputs cannot share a path");
            seen[full] = o.Name;
            bool hasForce = cmd.Options.Any(x => x.Name == "--force");
            Destinations.Check(path, o.Name, kind, inputs, force: hasForce && p.GetValue<bool>("--force"), forceOption: hasForce ? "--force" : null);
        }
    }

    /// <summary>What the command reads: its input options (a bundled dataset's name resolved to its files) and, for demo, the bundled models and data.</summary>
    public static List<DestinationInput> Inputs(ParseResult p)
    {
        var cmd = p.CommandResult.Command;
        var inputs = new List<DestinationInput>();
        foreach (var o in cmd.Options.Where(o => InputOptions.Contains(o.Name)))
        {
            if (p.GetValue<string>(o.Name) is not string v || string.IsNullOrWhiteSpace(v)) continue;
            // Named bundled datasets and tasks resolve to their files; a --tasks entry that is not a file is a task name.
            var files = o.Name is "--dataset" or "--calib" or "--eval" ? TextSources.Files(v)
                : o.Name == "--tasks" ? v.Split(',', StringSplitOptions.TrimEntries).Where(File.Exists).ToArray()
                : new[] { v };
            inputs.AddRange(files.Select(f => new DestinationInput(f, o.Name)));
        }
        if (cmd.Name == "tokenize" && p.GetValue<string>("--model") == null) inputs.Add(new DestinationInput(RepoPaths.OptTokenizer, "the bundled tokenizer"));
        if (cmd.Name == "demo") inputs.AddRange(DemoCommand.Inputs.Select(d => new DestinationInput(d, "the bundled model or data")));
        return inputs;
    }
}
