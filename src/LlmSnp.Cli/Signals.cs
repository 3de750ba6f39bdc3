using System.Runtime.InteropServices;
using LlmSnp;
using LlmSnp.Checkpoint;

/// <summary>
/// The signals that ask a run to stop — SIGHUP (a closed terminal), SIGINT, SIGQUIT, SIGTERM and SIGXCPU (past
/// `ulimit -t`) — end the process with one line and exit 128 + the signal's number, after removing this run's
/// unfinished outputs (StagingDirectory) and the .NET runtime's own files in TMPDIR. SIGXFSZ is ignored so that
/// passing a file-size limit makes the write fail (EFBIG, reported as one line) instead of killing the process
/// silently with its temporary output left behind.
/// </summary>
static class Signals
{
    static int _handling;

    /// <summary>Name and number (Linux) of each handled signal; the named ones are PosixSignal members, SIGXCPU is raw.</summary>
    public static readonly IReadOnlyList<(PosixSignal Signal, string Name, int Number)> Handled = new[]
    {
        (PosixSignal.SIGHUP, "SIGHUP", 1), (PosixSignal.SIGINT, "SIGINT", 2), (PosixSignal.SIGQUIT, "SIGQUIT", 3),
        (PosixSignal.SIGTERM, "SIGTERM", 15), ((PosixSignal)24, "SIGXCPU", 24),
    };

    public static IDisposable Install()
    {
        Runtime.IgnoreFileSizeSignal();
        var regs = new List<PosixSignalRegistration>();
        foreach (var (signal, _, _) in Handled)
        {
            // A raw number where the platform has no such signal: that one goes unhandled, the rest still are.
            try { regs.Add(PosixSignalRegistration.Create(signal, Handle)); }
            catch (Exception e) when (e is PlatformNotSupportedException or ArgumentOutOfRangeException or IOException) { }
        }
        return new Registrations(regs);
    }

    static void Handle(PosixSignalContext c)
    {
        c.Cancel = true;   // the default action would exit before the cleanup
        if (Interlocked.Exchange(ref _handling, 1) == 1) return;
        var (_, name, number) = Handled.First(h => h.Signal == c.Signal);
        var removed = StagingDirectory.RemoveAllLive();
        // Linux raises the soft CPU limit by a second as it sends SIGXCPU: the limit the user set is one less.
        string why = name == "SIGXCPU" && ResourceLimits.CpuSeconds is ulong t
            ? $"the CPU-time limit (ulimit -t) of {Math.Max(1, (long)t - 1)} s was reached (SIGXCPU); raise it (ulimit -t unlimited)"
            : $"interrupted by {name}";
        Failure.WriteLine($"error: {why}" + (removed.Count > 0 ? $"; removed the unfinished output {string.Join(", ", removed)}" : ""));
        // The work goes on in other threads until exit: keep its progress lines from following the error line.
        Console.SetError(TextWriter.Null);
        Console.SetOut(TextWriter.Null);
        Failure.ExitNow(128 + number);
    }

    sealed class Registrations(List<PosixSignalRegistration> regs) : IDisposable
    {
        public void Dispose() { foreach (var r in regs) r.Dispose(); }
    }
}
