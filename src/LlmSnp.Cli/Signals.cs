using System.Runtime.InteropServices;
using LlmSnp;
using LlmSnp.Checkpoint;

/// <summary>
/// SIGINT and SIGTERM end the process with one line and a non-zero exit (130, 143) after removing
/// this run's unfinished output (StagingDirectory); SIGXFSZ is ignored so that passing a file-size
/// limit makes the write fail (EFBIG, an IOException reported as one line) instead of killing the
/// process silently with its temporary directory left behind.
/// </summary>
static class Signals
{
    static int _handling;

    public static IDisposable Install()
    {
        Runtime.IgnoreFileSizeSignal();
        var regs = new[]
        {
            PosixSignalRegistration.Create(PosixSignal.SIGINT, Handle),
            PosixSignalRegistration.Create(PosixSignal.SIGTERM, Handle),
        };
        return new Registrations(regs);
    }

    static void Handle(PosixSignalContext c)
    {
        c.Cancel = true;   // the default action would exit before the cleanup
        if (Interlocked.Exchange(ref _handling, 1) == 1) return;
        var removed = StagingDirectory.RemoveAllLive();
        string name = c.Signal == PosixSignal.SIGINT ? "SIGINT" : "SIGTERM";
        Console.Error.WriteLine($"error: interrupted by {name}" + (removed.Count > 0 ? $"; removed the unfinished output {string.Join(", ", removed)}" : ""));
        Console.Error.Flush();
        // The work goes on in other threads until exit: keep its progress lines from following the error line.
        Console.SetError(TextWriter.Null);
        Console.SetOut(TextWriter.Null);
        Runtime.ExitNow(c.Signal == PosixSignal.SIGINT ? 130 : 143);
    }

    sealed class Registrations(PosixSignalRegistration[] regs) : IDisposable
    {
        public void Dispose() { foreach (var r in regs) r.Dispose(); }
    }
}
