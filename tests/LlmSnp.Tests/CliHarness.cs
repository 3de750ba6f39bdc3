using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LlmSnp.Tests;

/// <summary>The CLI in a child process (`dotnet LlmSnp.Cli.dll ...`), for the hardening tests.</summary>
static class CliHarness
{
    public static readonly string CliDll = Path.Combine(AppContext.BaseDirectory, "LlmSnp.Cli.dll");
    static string DotnetHost => Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host ? host : "dotnet";

    public sealed record Result(int ExitCode, string Stdout, string Stderr, string Command)
    {
        public string[] StderrLines => Stderr.TrimEnd('\n', '\r').Split('\n').Select(l => l.TrimEnd('\r')).Where(l => l.Length > 0).ToArray();
        public override string ToString() =>
            $"{Command}\nexit {ExitCode}\n--- stdout ---\n{(Stdout.Length > 2000 ? Stdout[..2000] + "..." : Stdout)}\n--- stderr ---\n{Stderr}";
    }

    /// <summary>Optionally through `bash -c PRELUDE; exec ...` (ulimit), as ReliabilityTests does.</summary>
    public static ProcessStartInfo Psi(string[] args, string? bashPrelude = null, IDictionary<string, string>? env = null)
    {
        Assert.True(File.Exists(CliDll), $"{CliDll} not found next to the test assembly");
        ProcessStartInfo psi;
        if (bashPrelude == null) { psi = new ProcessStartInfo(DotnetHost); psi.ArgumentList.Add(CliDll); }
        else
        {
            psi = new ProcessStartInfo("bash");
            psi.ArgumentList.Add("-c");
            psi.ArgumentList.Add(bashPrelude + "; exec \"$0\" \"$@\"");
            psi.ArgumentList.Add(DotnetHost);
            psi.ArgumentList.Add(CliDll);
        }
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.RedirectStandardOutput = psi.RedirectStandardError = true;
        psi.UseShellExecute = false;
        psi.WorkingDirectory = Repo.Root;
        psi.Environment["MKL_NUM_THREADS"] = "1";
        psi.Environment["OMP_NUM_THREADS"] = "1";
        psi.Environment.Remove("LLMSNP_DEBUG");
        psi.Environment.Remove("LLMSNP_HOME");
        if (env != null) foreach (var (k, v) in env) psi.Environment[k] = v;
        return psi;
    }

    public static Result Run(string[] args, string? bashPrelude = null, IDictionary<string, string>? env = null, int timeoutSeconds = 180)
    {
        using var p = Process.Start(Psi(args, bashPrelude, env))!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(timeoutSeconds)))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"llmsnp {string.Join(' ', args)} ran past {timeoutSeconds} s");
        }
        p.WaitForExit();
        return new Result(p.ExitCode, stdout.Result, stderr.Result, "llmsnp " + string.Join(' ', args));
    }

    public static string Succeeds(Result r)
    {
        Assert.True(r.ExitCode == 0, r.ToString());
        Assert.DoesNotContain("   at ", r.Stderr);
        return r.Stdout;
    }

    /// <summary>Exit 0, no stack trace, and stdout is exactly one JSON object (the CLI's success contract).</summary>
    public static JsonObject SucceedsJson(Result r)
    {
        Succeeds(r);
        JsonNode? node;
        try { node = JsonNode.Parse(r.Stdout); }
        catch (JsonException e) { throw new Xunit.Sdk.XunitException($"stdout is not one JSON document ({e.Message})\n{r}"); }
        Assert.True(node is JsonObject, r.ToString());
        return (JsonObject)node!;
    }

    /// <summary>
    /// <see cref="FailsWithOneLine"/> with exit 1, where blank lines count as lines too (onlyLine means one line, full stop)
    /// and, with <paramref name="completeLine"/>, stderr must end with a newline.
    /// </summary>
    public static string FailsStrict(Result r, bool onlyLine, bool completeLine, params string[] mentions)
    {
        Assert.True(!completeLine || r.Stderr.EndsWith('\n'), "stderr should end with a complete line\n" + r);
        Assert.True(!onlyLine || r.Stderr.TrimEnd('\n', '\r').Split('\n').Length == 1, "expected exactly one stderr line\n" + r);
        return FailsWithOneLine(r, onlyLine, 1, mentions);
    }

    /// <summary>Exit <paramref name="exit"/>, empty stdout, exactly one "error: " line and it is the last; with <paramref name="onlyLine"/> the only one.</summary>
    public static string FailsWithOneLine(Result r, bool onlyLine, int exit = 1, params string[] mentions)
    {
        Assert.True(r.ExitCode == exit, $"expected exit code {exit}\n" + r);
        Assert.True(r.Stdout.Length == 0, "expected empty stdout\n" + r);
        var lines = r.StderrLines;
        Assert.True(!onlyLine || lines.Length == 1, "expected exactly one stderr line\n" + r);
        Assert.True(lines.Count(l => l.StartsWith("error: ")) == 1, "expected exactly one 'error: ' line\n" + r);
        string line = lines[^1];
        Assert.True(line.StartsWith("error: ") && !line.StartsWith("error: internal failure"), r.ToString());
        Assert.DoesNotContain("   at ", r.Stderr);
        foreach (var m in mentions) Assert.True(line.Contains(m), $"the error should mention '{m}'\n{r}");
        return line;
    }
}
