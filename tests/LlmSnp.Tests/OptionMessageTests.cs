using System.CommandLine;
using System.Text.Json.Nodes;
using Xunit.Abstractions;
using static LlmSnp.Tests.CliRuns;

namespace LlmSnp.Tests;

/// <summary>
/// Every message about an option names that option and says what it accepts: numbers out of range (with the real
/// range), words outside a fixed vocabulary, values that select nothing, extra fields; and values that are in range
/// behave as documented rather than failing (a denormal temperature, an empty text, a very long word).
/// </summary>
[Collection("Console")]
public sealed class OptionMessageTests : IDisposable
{
    readonly ITestOutputHelper _out;
    readonly TempDir _tmp = new();
    public OptionMessageTests(ITestOutputHelper o) { _out = o; }
    public void Dispose() => _tmp.Dispose();

    /// <summary>Command path, then its required options filled with placeholders (parsing only: nothing runs).</summary>
    static List<string> Invocation(Command root, Command cmd, Option? except = null)
    {
        var path = new List<string>();
        for (Command? c = cmd; c != null && c != root; c = c.Parents.OfType<Command>().FirstOrDefault()) path.Insert(0, c.Name);
        foreach (var o in cmd.Options.Where(o => o.Required && o != except)) { path.Add(o.Name); path.Add(o.Name == "--tasks" ? "piqa" : "x"); }
        return path;
    }

    /// <summary>
    /// Every option with a fixed vocabulary (orderings, reconstructions, dtypes, devices, targets, methods, ratios, ids,
    /// shapes), in every command that has it: a wrong word, an empty entry and an extra field are refused while parsing,
    /// with one line that starts with that option's own name, never another's (compare --methods once blamed --ordering,
    /// convert --to blamed --dtype).
    /// </summary>
    [Fact]
    public void Every_fixed_vocabulary_option_is_refused_in_its_own_name()
    {
        var root = OptionChecks.Apply(Cli.Build());
        var checkedOptions = new List<string>();
        var bad = new[] { "bogus", "", ";", ",", "zca:lstsq:ratio:extra", "zca:bogus", "-1", "1.5", "mlp,,heads" };
        foreach (var cmd in OptionChecks.AllCommands(root))
            foreach (var o in cmd.Options)
            {
                if (OptionChecks.ParserOf(cmd, o) is not Action<string> parse) continue;
                int refused = 0;
                foreach (var v in bad)
                {
                    // The parser itself: a value it accepts is fine; one it refuses must be refused in this option's name.
                    try { parse(v); continue; }
                    catch (LlmSnpException e) { Assert.True(e.Message.StartsWith(o.Name + ":"), $"{cmd.Name} {o.Name} '{v}': '{e.Message}'"); }
                    var args = Invocation(root, cmd, o).Concat(new[] { o.Name, v }).ToArray();
                    var p = root.Parse(args);
                    Assert.True(p.Errors.Count > 0, $"llmsnp {string.Join(' ', args)} parsed without error");
                    string m = OptionChecks.Message(p.Errors);
                    Assert.True(m.StartsWith(o.Name + ":"), $"llmsnp {string.Join(' ', args)}: '{m}' does not start with {o.Name}");
                    Assert.DoesNotContain("\n", m);
                    refused++;
                }
                Assert.True(refused >= 2, $"{cmd.Name} {o.Name}: only {refused} of the bad values refused");
                checkedOptions.Add($"{cmd.Name} {o.Name}");
            }
        _out.WriteLine($"{checkedOptions.Count} options: {string.Join(", ", checkedOptions)}");
        foreach (var must in new[] { "compare --methods", "compare --targets", "prune --targets", "convert --to", "prune --ordering", "gguf --dtype", "compare --ratios" })
            Assert.Contains(must, checkedOptions);
    }

    /// <summary>
    /// As a user meets them, through the CLI: each message names the option and the real rule, and says nothing the
    /// command would then refuse (convert has no --force).
    /// </summary>
    [Fact]
    public void Messages_name_the_option_and_the_real_rule()
    {
        string model = Path.Combine(Repo.Root, "models", "stories260k");
        string existing = _tmp.Sub("existing");
        Directory.CreateDirectory(existing);
        var cases = new (string[] Args, string[] Mentions, string[] Absent)[]
        {
            (new[] { "compare", "--model", model, "--out", _tmp.Sub("c"), "--methods", "zca:lstsq:ratio:extra" }, new[] { "--methods", "4 fields" }, new[] { "--ordering" }),
            (new[] { "compare", "--model", model, "--out", _tmp.Sub("c"), "--methods", "bogus" }, new[] { "--methods", "unknown ordering" }, new[] { "--ordering" }),
            (new[] { "compare", "--model", model, "--out", _tmp.Sub("c"), "--methods", "zca:bogus" }, new[] { "--methods", "unknown reconstruction" }, new[] { "--reconstruct" }),
            (new[] { "compare", "--model", model, "--out", _tmp.Sub("c"), "--targets", "" }, new[] { "--targets" }, Array.Empty<string>()),
            (new[] { "compare", "--model", model, "--out", _tmp.Sub("c"), "--targets", ";" }, new[] { "--targets", "no target set" }, Array.Empty<string>()),
            (new[] { "prune", "--model", model, "--out", _tmp.Sub("p"), "--targets", "" }, new[] { "--targets" }, Array.Empty<string>()),
            (new[] { "convert", "--model", model, "--out", _tmp.Sub("v"), "--to", "f8" }, new[] { "--to", "unknown dtype" }, new[] { "--dtype" }),
            (new[] { "convert", "--model", model, "--out", existing, "--to", "float16" }, new[] { "--out", "already exists" }, new[] { "--force" }),
            (new[] { "prune", "--model", model, "--out", _tmp.Sub("p"), "--seed", "2147483648" }, new[] { "--seed", "from 0 to 2147483647" }, new[] { "at least" }),
            (new[] { "generate", "--model", model, "--prompt", "Once", "--seed", "-1" }, new[] { "--seed", "from 0 to 2147483647" }, Array.Empty<string>()),
        };
        foreach (var (args, mentions, absent) in cases)
        {
            var r = Run(args);
            string line = FailsWithOneLine(r, onlyLine: true, mentions);
            foreach (var a in absent) Assert.False(line.Contains(a), $"the line should not mention '{a}'\n{r}");
            _out.WriteLine(line);
        }
        Assert.Empty(Directory.GetFileSystemEntries(existing));
    }

    /// <summary>
    /// Values in range behave as documented: a denormal temperature samples the argmax (as temperature 0 does) instead
    /// of failing; an empty --text keeps the bos the tokenizer promises (the same first id as any other text); a word of
    /// a megabyte without spaces is refused at once with the bound named, instead of tokenizing for minutes.
    /// </summary>
    [Fact]
    public void In_range_values_behave_as_documented()
    {
        string stories = Path.Combine(Repo.Root, "models", "stories260k"), opt = Path.Combine(Repo.Root, "models", "opt-tiny-c4-v2");
        int[] NewIds(params string[] extra)
        {
            string json = _tmp.Sub($"generate-{Guid.NewGuid():N}.json");
            CliHarness.Succeeds(Run(new[] { "generate", "--model", stories, "--prompt", "Once upon a time", "--max-new-tokens", "8", "--json", json }.Concat(extra).ToArray()));
            return JsonNode.Parse(File.ReadAllText(json))!["new_ids"]!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
        }
        var greedy = NewIds("--temperature", "0");
        foreach (var t in new[] { "1e-310", "4.9e-324", "1e-300" })
            Assert.Equal(greedy, NewIds("--temperature", t, "--seed", "5"));

        foreach (var model in new[] { opt, stories, Path.Combine(Repo.Root, "models", "tinystories-656k") })
        {
            int[] Ids(string text) => Succeeds(Run(new[] { "tokenize", "--model", model, "--text", text }))["ids"]!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
            var empty = Ids("");
            var word = Ids("Hello");
            _out.WriteLine($"{Path.GetFileName(model)}: '' → [{string.Join(",", empty)}], 'Hello' → [{string.Join(",", word)}]");
            // The bos the tokenizer puts before any text (config's bos_token_id, when the text starts with it) is kept for the empty text, and nothing else.
            int? bos = JsonNode.Parse(File.ReadAllText(Path.Combine(model, "config.json")))!["bos_token_id"]?.GetValue<int>();
            if (bos is int b && word[0] == b) Assert.Equal(new[] { b }, empty);
            else Assert.Empty(empty);
        }

        string longWord = _tmp.Sub("word.txt");
        File.WriteAllText(longWord, new string('a', 1 << 20));
        _out.WriteLine(FailsWithOneLine(Run(new[] { "tokenize", "--model", opt, "--file", longWord }), onlyLine: true, "32768", "split it"));
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
}
