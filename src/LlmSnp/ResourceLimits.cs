using System.Runtime.InteropServices;

namespace LlmSnp;

/// <summary>
/// The process's resource limits (getrlimit) and the one line that names the one a failure ran into: a write past
/// `ulimit -f`, an allocation past `ulimit -v`, a file opened past `ulimit -n`. .NET and libtorch report these as an
/// ArgumentOutOfRangeException, an OutOfMemoryException or a libtorch allocator error, an assembly that "could not
/// be loaded", none of which says what to raise.
/// </summary>
public static partial class ResourceLimits
{
    [LibraryImport("libc", EntryPoint = "getrlimit")]
    private static unsafe partial int GetRLimit(int resource, ulong* limits);

    const int RlimitCpu = 0, RlimitFsize = 1, RlimitNofile = 7, RlimitAs = 9;

    /// <summary>The soft limit, or null when unlimited (or unknown: not Linux).</summary>
    static unsafe ulong? Soft(int resource)
    {
        if (!OperatingSystem.IsLinux()) return null;
        ulong* l = stackalloc ulong[2];   // struct rlimit { rlim_t cur, max } on 64-bit Linux
        try { if (GetRLimit(resource, l) != 0) return null; }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { return null; }
        return l[0] == ulong.MaxValue ? null : l[0];
    }

    /// <summary>RLIMIT_FSIZE in bytes (`ulimit -f` counts KiB in bash).</summary>
    public static ulong? FileSize => Soft(RlimitFsize);
    /// <summary>RLIMIT_AS in bytes (`ulimit -v` counts KiB).</summary>
    public static ulong? AddressSpace => Soft(RlimitAs);
    /// <summary>RLIMIT_NOFILE: open file descriptors (`ulimit -n`).</summary>
    public static ulong? OpenFiles => Soft(RlimitNofile);
    /// <summary>RLIMIT_CPU in seconds (`ulimit -t`).</summary>
    public static ulong? CpuSeconds => Soft(RlimitCpu);

    /// <summary>Below this many descriptors a failure to open or load anything is put down to the limit.</summary>
    public const int FewOpenFiles = 256;

    static string Kib(ulong bytes) => $"{bytes / 1024} KiB";

    public static string FileSizeLine() => FileSize is ulong f
        ? $"file too large: the file-size limit (ulimit -f) is {Kib(f)}; raise it (ulimit -f unlimited)"
        : "file too large for the file system (EFBIG)";

    public static string MemoryLine(string detail) => AddressSpace is ulong a
        ? $"out of memory under the virtual-memory limit (ulimit -v) of {Kib(a)}; raise it (ulimit -v unlimited): libtorch and the .NET runtime alone reserve about 4 GiB of address space"
        : $"out of memory ({detail})";

    public static string OpenFilesLine() =>
        $"too many open files: the open-file limit (ulimit -n) is {OpenFiles?.ToString() ?? "unlimited"}; raise it (ulimit -n 1024)";

    /// <summary>Past the file system's size limit, .NET's writes throw this rather than an IOException.</summary>
    public static bool IsFileTooLarge(Exception e) =>
        e is ArgumentOutOfRangeException { ParamName: "value" } && e.TargetSite?.DeclaringType?.Namespace == "System.IO"
        || e is IOException && e.Message.Contains("File too large", StringComparison.Ordinal);

    static bool IsOutOfMemory(Exception e) =>
        e is OutOfMemoryException || e is InsufficientMemoryException
        || e.Message.Contains("can't allocate memory", StringComparison.OrdinalIgnoreCase)
        || e.Message.Contains("Cannot allocate memory", StringComparison.Ordinal)
        || e.Message.Contains("std::bad_alloc", StringComparison.Ordinal);

    static bool IsTooManyOpenFiles(Exception e) =>
        e is IOException && (e.Message.Contains("Too many open files", StringComparison.Ordinal) || e.HResult is 24 or 23);

    /// <summary>A file, assembly or native library that could not be opened: under a small limit, the limit's doing.</summary>
    static bool IsLoadFailure(Exception e) =>
        e is FileNotFoundException or FileLoadException or DllNotFoundException or BadImageFormatException
        || e is NotSupportedException && e.Message.Contains("libtorch", StringComparison.Ordinal);

    /// <summary>The exception and everything inside it (no LINQ: this runs when assemblies may not load).</summary>
    static List<Exception> Chain(Exception e)
    {
        var all = new List<Exception>();
        void Add(Exception? x)
        {
            for (; x != null; x = x.InnerException)
            {
                all.Add(x);
                if (x is AggregateException a) foreach (var inner in a.InnerExceptions) Add(inner);
            }
        }
        Add(e);
        return all;
    }

    /// <summary>One line naming the limit a failure ran into (and what to raise), or null when none explains it.</summary>
    public static string? Explain(Exception e)
    {
        var chain = Chain(e);
        bool load = false;
        foreach (var x in chain) if (IsFileTooLarge(x)) return FileSizeLine();
        foreach (var x in chain) if (IsOutOfMemory(x)) return MemoryLine(x.Message.Split('\n')[0].Trim());
        foreach (var x in chain) if (IsTooManyOpenFiles(x)) return OpenFilesLine();
        foreach (var x in chain) load |= IsLoadFailure(x);
        if (load)
        {
            // libtorch (~1.5 GB mapped) or an assembly could not be loaded: a small address space or descriptor limit does that.
            if (OpenFiles is ulong n && n < FewOpenFiles) return OpenFilesLine();
            if (AddressSpace is not null) return MemoryLine("a library could not be loaded");
        }
        return null;
    }
}
