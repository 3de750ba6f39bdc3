using System.Diagnostics;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LlmSnp.Tests;

/// <summary>The CLI in a child process (`dotnet LlmSnp.Cli.dll ...`), and what the tests check around it.</summary>
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

    /// <summary>Optionally through `bash -c PRELUDE; exec ...` (ulimit).</summary>
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

    // ---------------------------------------------------------------- files around a run

    /// <summary>SHA-256, mtime and length of every file under a directory, by relative path.</summary>
    public static SortedDictionary<string, (string Sha, DateTime MTime, long Length)> Snapshot(string dir)
    {
        var d = new SortedDictionary<string, (string, DateTime, long)>(StringComparer.Ordinal);
        foreach (var f in Directory.GetFiles(dir, "*", SearchOption.AllDirectories))
        {
            using var s = File.OpenRead(f);
            d[Path.GetRelativePath(dir, f)] = (Convert.ToHexStringLower(SHA256.HashData(s)), File.GetLastWriteTimeUtc(f), new FileInfo(f).Length);
        }
        return d;
    }

    public static void AssertSameSnapshot(SortedDictionary<string, (string Sha, DateTime MTime, long Length)> before, string dir, string what)
    {
        var after = Snapshot(dir);
        Assert.True(before.Keys.SequenceEqual(after.Keys), $"{what}: files changed: [{string.Join(", ", before.Keys)}] → [{string.Join(", ", after.Keys)}]");
        foreach (var (k, v) in before)
        {
            Assert.True(v.Sha == after[k].Sha, $"{what}: {k} changed content");
            Assert.True(v.MTime == after[k].MTime, $"{what}: {k} mtime changed {v.MTime:o} → {after[k].MTime:o}");
        }
    }

    /// <summary>The names in <paramref name="parent"/> other than <paramref name="name"/>, sorted.</summary>
    public static string[] Siblings(string parent, string name) =>
        Directory.GetFileSystemEntries(parent).Select(Path.GetFileName).Where(n => n != name).Select(n => n!).Order(StringComparer.Ordinal).ToArray();

    // ---------------------------------------------------------------- a run caught mid-write

    /// <summary>
    /// bash starts the CLI through python3, which restores the default action of SIGINT, SIGQUIT and SIGHUP before
    /// exec'ing it (a background job of a non-interactive shell starts with SIGINT and SIGQUIT ignored, and an
    /// ignored signal stays ignored across exec); bash waits until <paramref name="ready"/> (a shell condition)
    /// holds, signals the CLI by pid and reports its exit status (the shell, not this test host, is its parent).
    /// </summary>
    public static Result SignalledRun(string[] args, string ready, int signal, IDictionary<string, string>? env = null, double after = 0)
    {
        string script = "python3 -c 'import os, signal, sys\nfor s in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP): signal.signal(s, signal.SIG_DFL)\nos.execvp(sys.argv[1], sys.argv[1:])' \"$0\" \"$@\" & pid=$!; " +
                        $"for i in $(seq 1 2400); do {ready} && break; kill -0 $pid 2>/dev/null || break; sleep 0.05; done; " +
                        $"sleep {after.ToString(System.Globalization.CultureInfo.InvariantCulture)}; kill -{signal} $pid; wait $pid; echo \"exit=$?\" >&2";
        var psi = Psi(args, env: env);
        psi.ArgumentList.Insert(0, psi.FileName);
        psi.ArgumentList.Insert(0, script);
        psi.ArgumentList.Insert(0, "-c");
        psi.FileName = "bash";
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(240)))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"llmsnp {string.Join(' ', args)} (signal {signal}) ran past 240 s");
        }
        p.WaitForExit();
        string err = stderr.Result;
        var lines = err.TrimEnd('\n').Split('\n');
        Assert.True(lines[^1].StartsWith("exit="), err);
        return new Result(int.Parse(lines[^1]["exit=".Length..]), stdout.Result, string.Join('\n', lines[..^1]) + "\n", $"llmsnp {string.Join(' ', args)} (signal {signal})");
    }
}

/// <summary>
/// An LD_PRELOAD shim over write/pwrite/writev for the CLI in a child process, compiled once with the system C
/// compiler: ENOSPC_AFTER_BYTES makes regular-file writes fail with ENOSPC past that many bytes (a full disk);
/// STALL_PATH and STALL_AT make the STALL_AT-th write to a file whose path contains STALL_PATH create STALL_MARKER
/// and then never return, so that a run is caught mid-write at a chosen point, every time, for a signal or a kill.
/// </summary>
static class WriteShim
{
    const string Source = """
        #define _GNU_SOURCE
        #include <dlfcn.h>
        #include <errno.h>
        #include <fcntl.h>
        #include <stdio.h>
        #include <stdlib.h>
        #include <string.h>
        #include <sys/stat.h>
        #include <sys/types.h>
        #include <sys/uio.h>
        #include <unistd.h>
        static long long left = -2, stall_at = -2, seen = 0;
        static const char *stall_path, *marker;
        static void init(void) {
            if (left != -2) return;
            const char* s = getenv("ENOSPC_AFTER_BYTES"); left = s ? atoll(s) : -1;
            stall_path = getenv("STALL_PATH"); marker = getenv("STALL_MARKER");
            s = getenv("STALL_AT"); stall_at = s ? atoll(s) : 1;
        }
        /* 1: fail with ENOSPC; never returns when this write is the one to stall at. */
        static int check(int fd, size_t n) {
            struct stat st;
            init();
            if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
            if (stall_path && marker) {
                char link[64], path[4096];
                snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
                ssize_t k = readlink(link, path, sizeof path - 1);
                if (k > 0) {
                    path[k] = 0;
                    if (strstr(path, stall_path) && __atomic_add_fetch(&seen, 1, __ATOMIC_SEQ_CST) == stall_at) {
                        int m = open(marker, O_CREAT | O_WRONLY, 0644);
                        if (m >= 0) close(m);
                        for (;;) pause();
                    }
                }
            }
            if (left < 0) return 0;
            if ((long long)n > left) { left = 0; errno = ENOSPC; return 1; }
            left -= (long long)n;
            return 0;
        }
        static size_t total(const struct iovec* v, int c) { size_t n = 0; for (int i = 0; i < c; i++) n += v[i].iov_len; return n; }
        ssize_t write(int fd, const void* b, size_t n) {
            static ssize_t (*real)(int, const void*, size_t); if (!real) real = dlsym(RTLD_NEXT, "write");
            return check(fd, n) ? -1 : real(fd, b, n); }
        ssize_t pwrite(int fd, const void* b, size_t n, off_t o) {
            static ssize_t (*real)(int, const void*, size_t, off_t); if (!real) real = dlsym(RTLD_NEXT, "pwrite");
            return check(fd, n) ? -1 : real(fd, b, n, o); }
        ssize_t pwrite64(int fd, const void* b, size_t n, off_t o) {
            static ssize_t (*real)(int, const void*, size_t, off_t); if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
            return check(fd, n) ? -1 : real(fd, b, n, o); }
        ssize_t writev(int fd, const struct iovec* v, int c) {
            static ssize_t (*real)(int, const struct iovec*, int); if (!real) real = dlsym(RTLD_NEXT, "writev");
            return check(fd, total(v, c)) ? -1 : real(fd, v, c); }
        ssize_t pwritev(int fd, const struct iovec* v, int c, off_t o) {
            static ssize_t (*real)(int, const struct iovec*, int, off_t); if (!real) real = dlsym(RTLD_NEXT, "pwritev");
            return check(fd, total(v, c)) ? -1 : real(fd, v, c, o); }
        """;

    static readonly Lazy<string> Library = new(Build);

    /// <summary>The compiled shim (a C compiler is needed: the `cc` of build-essential).</summary>
    public static string Path => Library.Value;

    static string Build()
    {
        string dir = System.IO.Path.Combine(System.IO.Path.GetTempPath(), $"llmsnp-write-shim-{Environment.ProcessId}");
        Directory.CreateDirectory(dir);
        AppDomain.CurrentDomain.ProcessExit += (_, _) => { try { Directory.Delete(dir, true); } catch (IOException) { } };
        string src = System.IO.Path.Combine(dir, "shim.c"), so = System.IO.Path.Combine(dir, "libwriteshim.so");
        File.WriteAllText(src, Source);
        var errors = new List<string>();
        foreach (var cc in new[] { "cc", "gcc", "clang" })
        {
            try
            {
                using var p = Process.Start(new ProcessStartInfo(cc, new[] { "-shared", "-fPIC", "-O1", "-o", so, src, "-ldl" })
                { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false })!;
                string err = p.StandardError.ReadToEnd();
                p.WaitForExit();
                if (p.ExitCode == 0 && File.Exists(so)) return so;
                errors.Add($"{cc}: {err}");
            }
            catch (System.ComponentModel.Win32Exception) { errors.Add($"{cc}: not found"); }
        }
        throw new InvalidOperationException("the write shim needs a C compiler (apt-get install gcc): " + string.Join("; ", errors));
    }

    /// <summary>Environment that stalls the <paramref name="at"/>-th write to a path containing <paramref name="pathPart"/>, touching <paramref name="marker"/> first.</summary>
    public static Dictionary<string, string> Stall(string pathPart, string marker, int at = 1) => new()
    {
        ["LD_PRELOAD"] = Path, ["STALL_PATH"] = pathPart, ["STALL_MARKER"] = marker, ["STALL_AT"] = at.ToString(),
    };

    /// <summary>Environment under which regular-file writes fail with ENOSPC after <paramref name="bytes"/> bytes.</summary>
    public static Dictionary<string, string> DiskFull(long bytes) => new() { ["LD_PRELOAD"] = Path, ["ENOSPC_AFTER_BYTES"] = bytes.ToString() };
}

/// <summary>Shorthands the CLI tests share: a small OPT, quick calibration, and the harness's checks as the tests read them.</summary>
static class CliRuns
{
    /// <summary>A small OPT whose vocabulary covers the bundled tokenizer (calibration ids reach ~50265).</summary>
    public static TinyOpt SmallOpt => new() { Vocab = 50272, Hidden = 32, Heads = 4, Ffn = 64, Layers = 2, MaxPositions = 64 };

    public static readonly string[] QuickCalib = { "--calib", "wikitext2", "--calib-samples", "16", "--calib-seqlen", "32" };

    public static string[] PruneArgs(string model, string outDir, params string[] extra) =>
        new[] { "prune", "--model", model, "--out", outDir }.Concat(QuickCalib).Concat(extra).ToArray();

    public static CliHarness.Result Run(string[] args, string? bashPrelude = null, IDictionary<string, string>? env = null) => CliHarness.Run(args, bashPrelude, env);

    /// <summary>Exit 0 and stdout one JSON object.</summary>
    public static System.Text.Json.Nodes.JsonObject Succeeds(CliHarness.Result r) => CliHarness.SucceedsJson(r);

    /// <summary>Exit 1, empty stdout, exactly one "error: " line (the last; progress lines may precede it unless <paramref name="onlyLine"/>).</summary>
    public static string FailsWithOneLine(CliHarness.Result r, bool onlyLine, params string[] mentions) => CliHarness.FailsStrict(r, onlyLine, completeLine: false, mentions);

    public static SortedDictionary<string, (string Sha, DateTime MTime, long Length)> Snapshot(string dir) => CliHarness.Snapshot(dir);

    public static void AssertSameSnapshot(SortedDictionary<string, (string Sha, DateTime MTime, long Length)> before, string dir, string what) =>
        CliHarness.AssertSameSnapshot(before, dir, what);

    public static string[] Siblings(string parent, string name) => CliHarness.Siblings(parent, name);
}
