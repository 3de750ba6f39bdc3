using System.Runtime.InteropServices;

namespace LlmSnp.Checkpoint;

/// <summary>What a path names on disk, without following a final symbolic link unless asked.</summary>
public enum FileNodeKind { Missing, Regular, Directory, SymbolicLink, CharacterDevice, BlockDevice, Fifo, Socket }

/// <summary>
/// File types and identities (device, inode) through statx(2), and physical paths through realpath(3): what
/// .NET's File/Directory.Exists cannot tell (a character device or a FIFO passes for a file, two paths for one
/// directory look different). Elsewhere than on glibc/Linux it falls back to .NET's view (no device types).
/// </summary>
public static partial class FileNodes
{
    [LibraryImport("libc", EntryPoint = "statx", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static unsafe partial int StatX(int dirfd, string path, int flags, uint mask, byte* buffer);

    [LibraryImport("libc", EntryPoint = "realpath", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial nint RealPath(string path, nint resolved);

    [LibraryImport("libc", EntryPoint = "free")]
    private static partial void Free(nint p);

    const int AtFdCwd = -100, AtSymlinkNoFollow = 0x100;
    const uint StatxType = 0x1, StatxIno = 0x100;

    /// <summary>Device and inode: the same for every path that reaches one file or directory (links, bind mounts).</summary>
    public readonly record struct Identity(uint DevMajor, uint DevMinor, ulong Inode);

    static bool _native = OperatingSystem.IsLinux();

    /// <summary>statx fields (mode, inode, device) or null when the path does not exist; throws where statx is unavailable.</summary>
    static unsafe (ushort Mode, Identity Id)? Stat(string path, bool follow)
    {
        byte* buf = stackalloc byte[256];   // struct statx: the same 256-byte layout on every architecture
        int rc = StatX(AtFdCwd, path, follow ? 0 : AtSymlinkNoFollow, StatxType | StatxIno, buf);
        if (rc != 0) return null;
        ushort mode = *(ushort*)(buf + 28);
        ulong ino = *(ulong*)(buf + 32);
        uint major = *(uint*)(buf + 136), minor = *(uint*)(buf + 140);
        return (mode, new Identity(major, minor, ino));
    }

    static FileNodeKind FromMode(ushort mode) => (mode & 0xF000) switch
    {
        0x8000 => FileNodeKind.Regular, 0x4000 => FileNodeKind.Directory, 0xA000 => FileNodeKind.SymbolicLink,
        0x2000 => FileNodeKind.CharacterDevice, 0x6000 => FileNodeKind.BlockDevice, 0x1000 => FileNodeKind.Fifo,
        _ => FileNodeKind.Socket,
    };

    /// <summary>The kind of node at <paramref name="path"/>; with <paramref name="follow"/>, of what a symbolic link leads to.</summary>
    public static FileNodeKind Kind(string path, bool follow = false)
    {
        if (_native)
        {
            try { return Stat(path, follow) is { } s ? FromMode(s.Mode) : FileNodeKind.Missing; }
            catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { _native = false; }
        }
        if (!follow && (File.Exists(path) || Directory.Exists(path)) && new FileInfo(path).LinkTarget != null) return FileNodeKind.SymbolicLink;
        return Directory.Exists(path) ? FileNodeKind.Directory : File.Exists(path) ? FileNodeKind.Regular : FileNodeKind.Missing;
    }

    /// <summary>The identity of what the path reaches (links followed), or null if it does not exist (or cannot be told).</summary>
    public static Identity? IdentityOf(string path)
    {
        if (!_native) return null;
        try { return Stat(path, follow: true)?.Id; }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { _native = false; return null; }
    }

    /// <summary>
    /// The path with every symbolic link and ".." resolved as the kernel would: realpath(3) of the deepest existing
    /// ancestor, then the components that do not exist yet.
    /// </summary>
    public static string PhysicalPath(string path)
    {
        string full = Path.GetFullPath(path);
        var rest = new Stack<string>();
        string? at = full;
        while (at != null)
        {
            if (Kind(at, follow: true) != FileNodeKind.Missing && Resolve(at) is string real)
                return rest.Aggregate(real, Path.Combine);
            rest.Push(Path.GetFileName(at));
            at = Path.GetDirectoryName(at);
        }
        return full;
    }

    static string? Resolve(string path)
    {
        if (!_native) return Path.GetFullPath(path);
        try
        {
            nint p = RealPath(path, 0);
            if (p == 0) return null;
            try { return Marshal.PtrToStringUTF8(p); }
            finally { Free(p); }
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { _native = false; return Path.GetFullPath(path); }
    }

    /// <summary>Words for a kind, as an error line says it: "a character device".</summary>
    public static string Describe(FileNodeKind k) => k switch
    {
        FileNodeKind.Regular => "a regular file", FileNodeKind.Directory => "a directory", FileNodeKind.SymbolicLink => "a symbolic link",
        FileNodeKind.CharacterDevice => "a character device", FileNodeKind.BlockDevice => "a block device", FileNodeKind.Fifo => "a FIFO (named pipe)",
        FileNodeKind.Socket => "a socket", _ => "missing",
    };
}
