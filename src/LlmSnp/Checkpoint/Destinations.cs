using System.Collections.Concurrent;

namespace LlmSnp.Checkpoint;

/// <summary>
/// Checks, before any work starts, that a run's outputs can be written: a prune that takes an hour
/// must not fail at the end on an unwritable <c>--json</c>, after its checkpoint is published.
/// Nothing is created: a probe file is made and removed in the directory that would be written.
/// </summary>
public static class Destinations
{
    /// <summary>A file written at the end (atomically, beside itself): its directory must exist and take new files.</summary>
    public static void CheckFile(string path, string option)
    {
        string full = Full(path, option);
        if (Directory.Exists(full)) throw new LlmSnpException($"{option} {path}: is a directory, not a file");
        string dir = Path.GetDirectoryName(full)!;
        if (File.Exists(dir)) throw new LlmSnpException($"{option} {path}: {dir} is a file, not a directory");
        if (!Directory.Exists(dir)) throw new LlmSnpException($"{option} {path}: directory {dir} does not exist");
        Probe(dir, option, path);
    }

    /// <summary>
    /// A directory the run creates. <paramref name="replaceable"/>: an existing one is replaced as a
    /// whole (only with <paramref name="force"/>); otherwise files are written into it. It must not
    /// be the input directory or overlap it.
    /// </summary>
    public static void CheckDirectory(string path, string option, bool replaceable, bool force, string? inputDir = null)
    {
        string full = Full(path, option).TrimEnd(Path.DirectorySeparatorChar);
        if (inputDir != null)
        {
            string src = Path.GetFullPath(inputDir).TrimEnd(Path.DirectorySeparatorChar);
            if (full == src || full.StartsWith(src + Path.DirectorySeparatorChar) || src.StartsWith(full + Path.DirectorySeparatorChar))
                throw new LlmSnpException($"{option} {path}: output directory must not be the model directory or inside it");
        }
        bool exists = Directory.Exists(full) || File.Exists(full);
        if (exists && replaceable && !force) throw new LlmSnpException($"{option} {path}: already exists; pass --force to replace it");
        if (File.Exists(full) && !replaceable) throw new LlmSnpException($"{option} {path}: is a file, not a directory");
        if (Directory.Exists(full) && !replaceable) { Probe(full, option, path); return; }
        // The directory is created (or renamed into place) later: the nearest existing ancestor must take it.
        string? ancestor = Path.GetDirectoryName(full);
        while (ancestor != null && !Directory.Exists(ancestor))
        {
            if (File.Exists(ancestor)) throw new LlmSnpException($"{option} {path}: {ancestor} is a file, not a directory");
            ancestor = Path.GetDirectoryName(ancestor);
        }
        if (ancestor == null) throw new LlmSnpException($"{option} {path}: no existing directory above it");
        Probe(ancestor, option, path);
    }

    static string Full(string path, string option)
    {
        if (string.IsNullOrWhiteSpace(path)) throw new LlmSnpException($"{option}: empty path");
        try { return Path.GetFullPath(path); }
        catch (Exception e) when (e is ArgumentException or NotSupportedException or PathTooLongException)
        {
            throw new LlmSnpException($"{option} {path}: not a usable path ({e.Message})");
        }
    }

    /// <summary>Creates and removes a hidden file: the only test that covers permissions, read-only mounts and /proc alike.</summary>
    static void Probe(string dir, string option, string path)
    {
        string probe = Path.Combine(dir, $".llmsnp-probe-{Environment.ProcessId}-{Guid.NewGuid():N}");
        try
        {
            using (new FileStream(probe, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1, FileOptions.DeleteOnClose)) { }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            string why = e switch
            {
                UnauthorizedAccessException => "permission denied",
                FileNotFoundException or DirectoryNotFoundException => "the file system refuses new files there",
                _ => e.Message.Replace($" : '{probe}'", "").Replace($"'{probe}'", "a new file"),
            };
            throw new LlmSnpException($"{option} {path}: cannot create files in {dir} ({why})");
        }
        finally { try { File.Delete(probe); } catch (Exception e) when (e is IOException or UnauthorizedAccessException) { } }
    }
}

/// <summary>
/// The hidden sibling an atomic output is staged in, <c>.NAME.tmp-PID-ID</c>, renamed into place
/// when complete. The pid in the name lets a later run remove what a killed one left (only when
/// that process is gone), and the live ones are tracked so a signal handler can remove them.
/// </summary>
public static class StagingDirectory
{
    static readonly ConcurrentDictionary<string, byte> Live = new(StringComparer.Ordinal);

    public static string Prefix(string name) => $".{name}.tmp-";

    /// <summary>Removes stale siblings of earlier killed runs, then creates a new staging directory.</summary>
    public static string Create(string parent, string name, Action<string>? log)
    {
        RemoveStale(parent, name, log);
        string dir = Path.Combine(parent, $"{Prefix(name)}{Environment.ProcessId}-{Guid.NewGuid():N}");
        Live[dir] = 0;
        try { Directory.CreateDirectory(dir); }
        catch { Live.TryRemove(dir, out _); throw; }
        return dir;
    }

    /// <summary>The directory was published or removed: a signal no longer needs to clean it.</summary>
    public static void Release(string dir) => Live.TryRemove(dir, out _);

    /// <summary>
    /// A scratch file or directory of this run (a timed GGUF, compare's pruned rows, a benchmark's
    /// checkpoint) that a signal should remove as well; <see cref="Release"/> it once it is deleted.
    /// </summary>
    public static void Track(string path) => Live[path] = 0;

    /// <summary>Removes every staging directory and tracked scratch path of this process that is still live (for a signal handler); returns them.</summary>
    public static IReadOnlyList<string> RemoveAllLive()
    {
        var removed = new List<string>();
        foreach (var dir in Live.Keys)
        {
            Live.TryRemove(dir, out _);
            try
            {
                if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
                else if (File.Exists(dir)) File.Delete(dir);
                else continue;
                removed.Add(dir);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        }
        return removed;
    }

    /// <summary>
    /// Removes <c>.NAME.tmp-PID-*</c> siblings whose process no longer runs. Names without a pid
    /// (older versions) and ones whose pid is alive are left alone: they may still be written.
    /// </summary>
    public static IReadOnlyList<string> RemoveStale(string parent, string name, Action<string>? log)
    {
        var removed = new List<string>();
        if (!Directory.Exists(parent)) return removed;
        string prefix = Prefix(name);
        IEnumerable<string> candidates;
        try { candidates = Directory.EnumerateDirectories(parent, prefix + "*").ToList(); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return removed; }
        foreach (var dir in candidates)
        {
            string rest = Path.GetFileName(dir)[prefix.Length..];
            int dash = rest.IndexOf('-');
            if (dash <= 0 || !int.TryParse(rest[..dash], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int pid)) continue;
            if (pid == Environment.ProcessId || IsRunning(pid)) continue;
            try
            {
                Directory.Delete(dir, recursive: true);
                removed.Add(dir);
                log?.Invoke($"removed {dir}: left by an earlier run (process {pid}) that did not finish");
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                log?.Invoke($"warning: could not remove {dir}, left by an earlier run (process {pid}): {e.Message}");
            }
        }
        return removed;
    }

    static bool IsRunning(int pid)
    {
        if (OperatingSystem.IsLinux()) return Directory.Exists($"/proc/{pid}");
        try { using var p = System.Diagnostics.Process.GetProcessById(pid); return !p.HasExited; }
        catch (ArgumentException) { return false; }
        catch (InvalidOperationException) { return false; }
    }
}
