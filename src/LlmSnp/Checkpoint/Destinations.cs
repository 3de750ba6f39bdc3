using System.Collections.Concurrent;

namespace LlmSnp.Checkpoint;

/// <summary>How a command writes a destination.</summary>
public enum DestinationKind
{
    /// <summary>One file, written to a hidden sibling and renamed over the path (--json, export gguf --out).</summary>
    File,
    /// <summary>A directory staged beside itself and renamed into place; an existing one is replaced only with the force option (prune, convert).</summary>
    ReplacedDirectory,
    /// <summary>A directory that files are written into, created if missing (compare, demo, bench --work-dir).</summary>
    DirectoryWrittenInto,
}

/// <summary>A path a command reads, and what named it: an option ("--model") or a description ("the bundled tokenizer").</summary>
public sealed record DestinationInput(string Path, string Option);

/// <summary>
/// The one check of every output path, before any work starts: a prune that takes an hour must not fail at the
/// end on an unwritable <c>--json</c>, and no output may ever replace or land inside an input (the model
/// directory and its files, a dataset), replace something that is not a regular file or directory (a device, a
/// FIFO, a socket, a symbolic link: renaming over /dev/null would replace the device), or sit under a file.
/// Inputs are compared by identity (device, inode) along the physical path, so symbolic links, "..", hard links
/// and bind mounts do not get an output past it. Nothing is created: a probe file is made and removed in the
/// directory that would be written.
/// </summary>
public static class Destinations
{
    /// <summary>A file written at the end (atomically, beside itself).</summary>
    public static void CheckFile(string path, string option, IReadOnlyList<DestinationInput>? inputs = null) =>
        Check(path, option, DestinationKind.File, inputs ?? Array.Empty<DestinationInput>());

    /// <summary>A directory the run creates or replaces (<paramref name="replaceable"/>) or writes files into.</summary>
    public static void CheckDirectory(string path, string option, bool replaceable, bool force, string? inputDir = null) =>
        Check(path, option, replaceable ? DestinationKind.ReplacedDirectory : DestinationKind.DirectoryWrittenInto,
            inputDir == null ? Array.Empty<DestinationInput>() : new[] { new DestinationInput(inputDir, "--model") }, force, replaceable ? "--force" : null);

    /// <summary>
    /// Throws a one-line <see cref="LlmSnpException"/> naming <paramref name="option"/> if the destination cannot or must
    /// not be written. <paramref name="forceOption"/>: the option that allows replacing an existing directory (null: none).
    /// </summary>
    public static void Check(string path, string option, DestinationKind kind, IReadOnlyList<DestinationInput> inputs, bool force = false, string? forceOption = null)
    {
        string full = Full(path, option).TrimEnd(Path.DirectorySeparatorChar);
        if (full.Length == 0) full = "/";
        string Fail(string why) => throw new LlmSnpException($"{option} {path}: {why}");

        var node = FileNodes.Kind(full);
        // Never replaced or written through: whatever is not a regular file or a real directory.
        if (node is not (FileNodeKind.Missing or FileNodeKind.Regular or FileNodeKind.Directory))
        {
            var target = node == FileNodeKind.SymbolicLink ? FileNodes.Kind(full, follow: true) : node;
            bool throughLink = node == FileNodeKind.SymbolicLink;
            // A directory written into may be reached through a link (out → /scratch/out): nothing replaces the link.
            if (!(throughLink && target == FileNodeKind.Directory && kind == DestinationKind.DirectoryWrittenInto))
            {
                string what = throughLink
                    ? $"is a symbolic link to {(target == FileNodeKind.Missing ? "a missing path" : FileNodes.Describe(target))} ({new FileInfo(full).LinkTarget})"
                    : $"is {FileNodes.Describe(node)}";
                Fail($"{what}, not a {(kind == DestinationKind.File ? "regular file" : "directory")}; it is never replaced or written through: give a new path");
            }
        }
        if (kind == DestinationKind.File && node == FileNodeKind.Directory) Fail("is a directory, not a file");
        if (kind != DestinationKind.File && node == FileNodeKind.Regular) Fail("is a file, not a directory");
        CheckInputs(full, path, option, kind, inputs);
        if (kind == DestinationKind.ReplacedDirectory && node == FileNodeKind.Directory && !force)
            Fail(forceOption != null ? $"already exists; pass {forceOption} to replace it" : "already exists; remove it or give a new path");

        if (kind == DestinationKind.DirectoryWrittenInto && node != FileNodeKind.Missing) { Probe(full, option, path); return; }
        // A file, or a directory created (or renamed into place) later: its nearest existing ancestor must take it.
        string? ancestor = Path.GetDirectoryName(full);
        while (ancestor != null && FileNodes.Kind(ancestor, follow: true) != FileNodeKind.Directory)
        {
            var k = FileNodes.Kind(ancestor, follow: true);
            if (k != FileNodeKind.Missing) Fail($"{ancestor} is {FileNodes.Describe(k)}, not a directory");
            if (kind == DestinationKind.File) Fail($"directory {ancestor} does not exist");
            ancestor = Path.GetDirectoryName(ancestor);
        }
        if (ancestor == null) Fail("no existing directory above it");
        Probe(ancestor!, option, path);
    }

    /// <summary>Refuses a destination that is an input, lies inside an input directory, or (replaced as a whole) holds an input.</summary>
    static void CheckInputs(string full, string path, string option, DestinationKind kind, IReadOnlyList<DestinationInput> inputs)
    {
        if (inputs.Count == 0) return;
        // The destination's physical path and the identity of it and each of its existing ancestors.
        string physical = FileNodes.PhysicalPath(full);
        var chain = new List<(string Path, FileNodes.Identity Id)>();
        for (string? at = physical; at != null; at = Path.GetDirectoryName(at))
            if (FileNodes.IdentityOf(at) is { } id) chain.Add((at, id));
        foreach (var input in Expand(inputs))
        {
            var inputKind = FileNodes.Kind(input.Path, follow: true);
            if (inputKind == FileNodeKind.Missing) continue;
            string inputPhysical = FileNodes.PhysicalPath(input.Path);
            var inputId = FileNodes.IdentityOf(input.Path);
            // "--model" reads "the --model directory m"; a described input ("the bundled tokenizer") reads as it is.
            string owner = input.Owner.Option.StartsWith("--", StringComparison.Ordinal) ? $"the {input.Owner.Option} {Kindword(FileNodes.Kind(input.Owner.Path, follow: true))}" : input.Owner.Option;
            string what = input.Path == input.Owner.Path ? $"{owner} {input.Owner.Path}" : $"{input.Path}, a file of {owner} {input.Owner.Path}";
            bool SameAs(string p, FileNodes.Identity? id) => inputId is { } x ? id == x : p == inputPhysical;
            // The destination itself, or an ancestor of it, is the input.
            for (int i = 0; i < chain.Count; i++)
            {
                if (!SameAs(chain[i].Path, chain[i].Id)) continue;
                bool itself = i == 0 && chain[0].Path == physical;
                Fail(itself ? $"is {what}; an output never replaces an input" : $"lies inside {what}; outputs are never written into an input");
            }
            if (inputId == null && (physical == inputPhysical || physical.StartsWith(inputPhysical + Path.DirectorySeparatorChar)))
                Fail($"lies inside {what}; outputs are never written into an input");
            // A directory replaced as a whole must not hold an input.
            if (kind == DestinationKind.ReplacedDirectory && chain.Count > 0 && chain[0].Path == physical)
            {
                var self = chain[0].Id;
                for (string? at = Path.GetDirectoryName(inputPhysical); at != null; at = Path.GetDirectoryName(at))
                    if (FileNodes.IdentityOf(at) == self || (FileNodes.IdentityOf(at) == null && at == physical))
                        Fail($"holds {what}; replacing it would delete an input");
            }
        }

        void Fail(string why) => throw new LlmSnpException($"{option} {path}: {why}");
    }

    static string Kindword(FileNodeKind k) => k == FileNodeKind.Directory ? "directory" : "file";

    /// <summary>Each input, and for a directory each file directly in it (a hub snapshot's files link to blobs elsewhere).</summary>
    static IEnumerable<(string Path, DestinationInput Owner)> Expand(IReadOnlyList<DestinationInput> inputs)
    {
        foreach (var input in inputs)
        {
            yield return (input.Path, input);
            if (FileNodes.Kind(input.Path, follow: true) != FileNodeKind.Directory) continue;
            IEnumerable<string> entries;
            try { entries = Directory.EnumerateFiles(input.Path).Take(10_000).ToList(); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { continue; }
            foreach (var f in entries)
                if (FileNodes.Kind(f) == FileNodeKind.SymbolicLink) yield return (f, input);
        }
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

    /// <summary>A hidden sibling path for a file staged the same way (AtomicFile), tracked until released.</summary>
    public static string NewFile(string path)
    {
        string full = Path.GetFullPath(path);
        string tmp = Path.Combine(Path.GetDirectoryName(full)!, $"{Prefix(Path.GetFileName(full))}{Environment.ProcessId}-{Guid.NewGuid():N}");
        Live[tmp] = 0;
        return tmp;
    }

    /// <summary>The directory was published or removed: a signal no longer needs to clean it.</summary>
    public static void Release(string dir) => Live.TryRemove(dir, out _);

    /// <summary>
    /// A scratch file or directory of this run (a timed GGUF, compare's pruned rows, a benchmark's
    /// checkpoint) that a signal should remove as well; <see cref="Release"/> it once it is deleted.
    /// </summary>
    public static void Track(string path) => Live[path] = 0;

    static readonly object PublishLock = new();

    /// <summary>
    /// Renames a staged output into place. A signal handler (<see cref="RemoveAllLive"/>) takes the same lock and
    /// never gives it back: a rename either completes before the cleanup starts (the output is whole) or never happens.
    /// </summary>
    public static void Publish(Action rename)
    {
        lock (PublishLock) rename();
    }

    /// <summary>
    /// For a signal handler: stops any later <see cref="Publish"/>, then removes every staging directory and tracked
    /// scratch path of this process that is still live; returns them. The work goes on in other threads until the
    /// process exits, so a directory that gains a file while it is removed is removed again.
    /// </summary>
    public static IReadOnlyList<string> RemoveAllLive()
    {
        Monitor.Enter(PublishLock);
        var removed = new List<string>();
        foreach (var dir in Live.Keys)
        {
            Live.TryRemove(dir, out _);
            for (int attempt = 0; attempt < 5; attempt++)
            {
                try
                {
                    if (FileNodes.Kind(dir) == FileNodeKind.Directory) Directory.Delete(dir, recursive: true);
                    else if (FileNodes.Kind(dir) != FileNodeKind.Missing) File.Delete(dir);
                    else break;
                    removed.Add(dir);
                    break;
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
            }
        }
        return removed;
    }

    /// <summary>
    /// Removes <c>.NAME.tmp-PID-*</c> siblings (directories or files) whose process no longer runs. Names without a pid
    /// (older versions) and ones whose pid is alive are left alone: they may still be written.
    /// </summary>
    public static IReadOnlyList<string> RemoveStale(string parent, string name, Action<string>? log)
    {
        var removed = new List<string>();
        if (!Directory.Exists(parent)) return removed;
        string prefix = Prefix(name);
        IEnumerable<string> candidates;
        try { candidates = Directory.EnumerateFileSystemEntries(parent, prefix + "*").ToList(); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return removed; }
        foreach (var dir in candidates)
        {
            string rest = Path.GetFileName(dir)[prefix.Length..];
            int dash = rest.IndexOf('-');
            if (dash <= 0 || !int.TryParse(rest[..dash], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int pid)) continue;
            if (pid == Environment.ProcessId || IsRunning(pid)) continue;
            try
            {
                if (FileNodes.Kind(dir) == FileNodeKind.Directory) Directory.Delete(dir, recursive: true); else File.Delete(dir);
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
