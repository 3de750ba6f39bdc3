using LlmSnp;

/// <summary>
/// How a failure ends the process: one "error: " line on stderr and the exit code, never a stack trace. Kept free of
/// System.CommandLine and LINQ so that it still works when the failure is an assembly that cannot be loaded (a small
/// `ulimit -n` or `ulimit -v`), and it writes to file descriptor 2 directly when .NET cannot open stderr.
/// </summary>
static class Failure
{
    /// <summary>Prints the line for <paramref name="e"/>; returns 1 for bad input, I/O or a resource limit, 70 for an internal fault (stack with LLMSNP_DEBUG=1).</summary>
    public static int Report(Exception e)
    {
        try { Console.Out.Flush(); } catch (IOException) { }   // stdout may be a closed pipe
        if (e is not LlmSnpException && ResourceLimits.Explain(e) is string limit)
        {
            WriteLine($"error: {limit}");
            return 1;
        }
        if (e is LlmSnpException or IOException or UnauthorizedAccessException)
        {
            WriteLine($"error: {e.Message}");
            return 1;
        }
        WriteLine($"error: internal failure: {e.GetType().Name}: {e.Message.Split('\n')[0]}");
        if (Environment.GetEnvironmentVariable("LLMSNP_DEBUG") == "1") WriteLine(e.ToString());
        return 70;
    }

    /// <summary>One line on stderr: through Console.Error, or straight to descriptor 2 when .NET cannot open it (no descriptor left to dup).</summary>
    public static void WriteLine(string line)
    {
        try
        {
            Console.Error.WriteLine(line);
            Console.Error.Flush();
            return;
        }
        catch (IOException) { }
        Runtime.WriteStderrRaw(line);
    }

    /// <summary>
    /// Ends the process at once (Runtime.ExitNow: libc _exit), first removing what the runtime's own shutdown would:
    /// its debugger pipes and diagnostics socket in TMPDIR (clr-debug-pipe-PID-*, dotnet-diagnostic-PID-*), which
    /// _exit leaves behind. (The llmsnp launcher also sets DOTNET_EnableDiagnostics=0, so that they are never made.)
    /// </summary>
    public static void ExitNow(int code)
    {
        RemoveRuntimeFiles();
        Runtime.ExitNow(code);
    }

    public static readonly string[] RuntimeFilePrefixes = { "clr-debug-pipe-", "dotnet-diagnostic-" };

    static void RemoveRuntimeFiles()
    {
        string tmp = Path.GetTempPath();
        foreach (var prefix in RuntimeFilePrefixes)
        {
            try
            {
                foreach (var f in Directory.EnumerateFileSystemEntries(tmp, $"{prefix}{Environment.ProcessId}-*"))
                    try { File.Delete(f); } catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        }
    }
}
