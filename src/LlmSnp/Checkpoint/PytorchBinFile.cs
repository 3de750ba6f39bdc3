using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;
using System.Numerics;
using System.Text;
using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

/// <summary>
/// A PyTorch `pytorch_model.bin` state dict, read strictly and without running anything: the zip format of
/// torch ≥ 1.6 (`ARCHIVE/data.pkl` + one stored entry `ARCHIVE/data/KEY` per storage) and the earlier
/// legacy format (magic, protocol and system pickles, the state-dict pickle, the storage keys, then each
/// storage as an int64 element count and its bytes). The pickle goes through <see cref="TorchPickle"/> (tensor
/// rebuilders only); every tensor view is checked against its storage; the file is memory-mapped and a
/// tensor's bytes are copied out only when it is read, so streaming a model reads one block at a time,
/// as with safetensors. CRCs are not verified (that would read every byte at open).
/// </summary>
public sealed class PytorchBinFile : ITensorFile
{
    public const string SingleFileName = "pytorch_model.bin";
    public const string IndexFileName = "pytorch_model.bin.index.json";
    /// <summary>A state-dict pickle is ~100 bytes per tensor; a bigger one is not a state dict.</summary>
    const long MaxPickleBytes = 256L << 20;
    static readonly BigInteger LegacyMagic = BigInteger.Parse("119547037146038801333356");

    sealed record View(TorchTensorRef Ref, long StorageStart, bool Contiguous);

    public string Path { get; }
    public IReadOnlyDictionary<string, TensorEntry> Tensors { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; } = new Dictionary<string, string>();
    readonly Dictionary<string, View> _views;
    readonly MemoryMappedFile? _map;
    readonly MemoryMappedViewAccessor? _view;

    PytorchBinFile(string path, Dictionary<string, TensorEntry> tensors, Dictionary<string, View> views, MemoryMappedFile? map, MemoryMappedViewAccessor? view)
    {
        Path = path; Tensors = tensors; _views = views; _map = map; _view = view;
    }

    /// <summary>Whether a file starts like a torch.save file (zip or legacy pickle), for a one-line hint elsewhere.</summary>
    public static bool LooksLikeTorchSave(ReadOnlySpan<byte> head) =>
        head.StartsWith("PK\x03\x04"u8) || (head.Length >= 4 && head[0] == 0x80 && head[2] == 0x8a && head[3] == 0x0a);

    public static PytorchBinFile Open(string path)
    {
        if (Directory.Exists(path)) throw new LlmSnpException($"{path}: is a directory, not a PyTorch checkpoint file");
        FileStream fs;
        try { fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1); }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException) { throw new LlmSnpException($"{path}: file not found"); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new LlmSnpException($"{path}: cannot open ({e.Message})", e); }
        MemoryMappedFile? map = null;
        MemoryMappedViewAccessor? view = null;
        try
        {
            long length = fs.Length;
            if (length < 22) throw new LlmSnpException($"{path}: not a PyTorch checkpoint ({length} bytes)");
            map = MemoryMappedFile.CreateFromFile(fs, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: false);
            fs = null!;   // the map owns the handle now
            view = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
            var (tensors, views) = Parse(path, view, length);
            return new PytorchBinFile(path, tensors, views, map, view);
        }
        catch
        {
            view?.Dispose();
            map?.Dispose();
            fs?.Dispose();
            throw;
        }
    }

    static unsafe (Dictionary<string, TensorEntry>, Dictionary<string, View>) Parse(string path, MemoryMappedViewAccessor view, long length)
    {
        byte* p = null;
        view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
        try
        {
            var file = new Bytes(path, p + view.PointerOffset, length);
            var head = file.Span(0, Math.Min(length, 8));
            if (head.StartsWith("PK\x03\x04"u8)) return ParseZip(file);
            if (head[0] == 0x80 && head[2] == 0x8a && head[3] == 0x0a) return ParseLegacy(file);
            if (head.StartsWith("\x1f\x8b"u8) || (length >= 262 && file.Span(257, 5).SequenceEqual("ustar"u8)))
                throw new LlmSnpException($"{path}: a tar-format torch.save file (torch < 0.4); load and re-save it with a current torch.save");
            throw new LlmSnpException($"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)");
        }
        finally { view.SafeMemoryMappedViewHandle.ReleasePointer(); }
    }

    /// <summary>Bounds-checked access to the mapped file.</summary>
    sealed unsafe class Bytes(string path, byte* start, long length)
    {
        public readonly string Path = path;
        public readonly long Length = length;

        public ReadOnlySpan<byte> Span(long offset, long count)
        {
            if (offset < 0 || count < 0 || count > int.MaxValue || offset > Length - count)
                throw new LlmSnpException($"{Path}: truncated or corrupt (needs bytes {offset}..{offset + count} of {Length})");
            return new ReadOnlySpan<byte>(start + offset, (int)count);
        }

        public ushort U16(long at) => BinaryPrimitives.ReadUInt16LittleEndian(Span(at, 2));
        public uint U32(long at) => BinaryPrimitives.ReadUInt32LittleEndian(Span(at, 4));
        public ulong U64(long at) => BinaryPrimitives.ReadUInt64LittleEndian(Span(at, 8));
    }

    // ------------------------------------------------------------------ zip (torch >= 1.6)

    sealed record ZipEntry(string Name, long DataOffset, long Size);

    static (Dictionary<string, TensorEntry>, Dictionary<string, View>) ParseZip(Bytes f)
    {
        var entries = ZipDirectory(f);
        var pkl = entries.Values.Where(e => e.Name.EndsWith("/data.pkl", StringComparison.Ordinal) && e.Name.IndexOf('/') == e.Name.Length - 9).ToList();
        if (pkl.Count != 1) throw new LlmSnpException($"{f.Path}: a zip archive without exactly one ARCHIVE/data.pkl: not a torch.save file");
        string prefix = pkl[0].Name[..^"data.pkl".Length];
        if (entries.TryGetValue(prefix + "byteorder", out var bo) && !f.Span(bo.DataOffset, bo.Size).SequenceEqual("little"u8))
            throw new LlmSnpException($"{f.Path}: saved on a big-endian machine (byteorder '{Encoding.ASCII.GetString(f.Span(bo.DataOffset, Math.Min(bo.Size, 16)))}'): not supported");
        if (pkl[0].Size > MaxPickleBytes) throw new LlmSnpException($"{f.Path}: data.pkl of {pkl[0].Size} bytes is larger than any state dict's");
        var pickle = f.Span(pkl[0].DataOffset, pkl[0].Size).ToArray();
        var storages = new Dictionary<string, TorchStorageRef>(StringComparer.Ordinal);
        string where = $"{f.Path} ({pkl[0].Name})";
        var (root, end) = TorchPickle.Load(where, pickle, 0, pid => Unify(where, storages, TorchPickle.StorageId(where, pid, legacy: false)));
        if (end != pickle.Length) throw new LlmSnpException($"{where}: {pickle.Length - end} bytes after the pickle's end");
        var state = TorchPickle.StateDict(where, root);
        return Views(f.Path, state, key =>
        {
            if (!entries.TryGetValue(prefix + "data/" + key, out var e)) throw new LlmSnpException($"{f.Path}: storage '{key}' ({prefix}data/{key}) is missing from the archive");
            return (e.DataOffset, e.Size);
        });
    }

    /// <summary>The archive's entries from its central directory (zip64 included), each checked against its local header.</summary>
    static Dictionary<string, ZipEntry> ZipDirectory(Bytes f)
    {
        // End of central directory: 22 bytes plus a comment of at most 65535, at the end of the file.
        long eocd = -1;
        for (long at = f.Length - 22; at >= Math.Max(0, f.Length - 22 - 65535); at--)
            if (f.U32(at) == 0x06054b50 && at + 22 + f.U16(at + 20) == f.Length) { eocd = at; break; }
        if (eocd < 0) throw new LlmSnpException($"{f.Path}: zip archive without an end-of-central-directory record (truncated?)");
        long count = f.U16(eocd + 10), cdSize = f.U32(eocd + 12), cdOffset = f.U32(eocd + 16);
        if (f.U16(eocd + 4) != 0 || f.U16(eocd + 6) != 0) throw new LlmSnpException($"{f.Path}: multi-volume zip archive: not a torch.save file");
        if (count == 0xFFFF || cdSize == 0xFFFFFFFF || cdOffset == 0xFFFFFFFF)
        {
            long loc = eocd - 20;
            if (loc < 0 || f.U32(loc) != 0x07064b50) throw new LlmSnpException($"{f.Path}: zip64 archive without its locator (truncated?)");
            long rec = (long)Math.Min(f.U64(loc + 8), long.MaxValue);
            if (f.U32(rec) != 0x06064b50) throw new LlmSnpException($"{f.Path}: zip64 end-of-central-directory record not found at {rec}");
            count = (long)Math.Min(f.U64(rec + 32), long.MaxValue);
            cdSize = (long)Math.Min(f.U64(rec + 40), long.MaxValue);
            cdOffset = (long)Math.Min(f.U64(rec + 48), long.MaxValue);
        }
        if (cdOffset > f.Length || cdSize > f.Length - cdOffset || count > cdSize / 46) throw new LlmSnpException($"{f.Path}: zip central directory runs past the end of the file (truncated?)");
        var entries = new Dictionary<string, ZipEntry>(StringComparer.Ordinal);
        long pos = cdOffset;
        for (long i = 0; i < count; i++)
        {
            if (f.U32(pos) != 0x02014b50) throw new LlmSnpException($"{f.Path}: zip central directory entry {i} is corrupt");
            int flags = f.U16(pos + 8), method = f.U16(pos + 10), nameLen = f.U16(pos + 28), extraLen = f.U16(pos + 30), commentLen = f.U16(pos + 32);
            long csize = f.U32(pos + 20), usize = f.U32(pos + 24), local = f.U32(pos + 42);
            var nameBytes = f.Span(pos + 46, nameLen);
            if (!System.Text.Unicode.Utf8.IsValid(nameBytes)) throw new LlmSnpException($"{f.Path}: zip entry {i} has a name that is not UTF-8");
            string name = Encoding.UTF8.GetString(nameBytes);
            // Zip64: the fields stored as 0xFFFFFFFF follow in the 0x0001 extra field, in this order.
            long x = pos + 46 + nameLen, xEnd = x + extraLen;
            while (x + 4 <= xEnd)
            {
                int id = f.U16(x), size = f.U16(x + 2);
                if (x + 4 + size > xEnd) throw new LlmSnpException($"{f.Path}: zip entry '{name}' has a malformed extra field");
                if (id == 0x0001)
                {
                    long q = x + 4, qEnd = q + size;
                    long Next() => q + 8 <= qEnd ? (long)Math.Min(f.U64((q += 8) - 8), long.MaxValue) : throw new LlmSnpException($"{f.Path}: zip entry '{name}' has a short zip64 field");
                    if (usize == 0xFFFFFFFF) usize = Next();
                    if (csize == 0xFFFFFFFF) csize = Next();
                    if (local == 0xFFFFFFFF) local = Next();
                }
                x += 4 + size;
            }
            if ((flags & 1) != 0) throw new LlmSnpException($"{f.Path}: zip entry '{name}' is encrypted");
            if (method != 0 || csize != usize) throw new LlmSnpException($"{f.Path}: zip entry '{name}' is compressed (method {method}); torch.save stores entries uncompressed");
            if (f.U32(local) != 0x04034b50) throw new LlmSnpException($"{f.Path}: zip entry '{name}' has no local header at {local}");
            int lNameLen = f.U16(local + 26), lExtraLen = f.U16(local + 28);
            if (!f.Span(local + 30, lNameLen).SequenceEqual(nameBytes)) throw new LlmSnpException($"{f.Path}: zip entry '{name}' has a different name in its local header");
            long data = local + 30 + lNameLen + lExtraLen;
            if (usize > f.Length - data) throw new LlmSnpException($"{f.Path}: zip entry '{name}' runs past the end of the file (truncated?)");
            if (!entries.TryAdd(name, new ZipEntry(name, data, usize))) throw new LlmSnpException($"{f.Path}: zip entry '{name}' appears twice");
            pos += 46 + nameLen + extraLen + commentLen;
        }
        return entries;
    }

    // ------------------------------------------------------------------ legacy (torch < 1.6, _use_new_zipfile_serialization=False)

    static (Dictionary<string, TensorEntry>, Dictionary<string, View>) ParseLegacy(Bytes f)
    {
        var prefix = f.Span(0, Math.Min(f.Length, MaxPickleBytes)).ToArray();
        var storages = new Dictionary<string, TorchStorageRef>(StringComparer.Ordinal);
        string where = f.Path;
        TorchStorageRef NoStorage(object?[] _) => throw new LlmSnpException($"{where}: legacy header pickle refers to a storage");
        var (magic, at) = TorchPickle.Load(where, prefix, 0, NoStorage);
        if (magic is not BigInteger m || m != LegacyMagic) throw new LlmSnpException($"{where}: not a PyTorch checkpoint (legacy magic number missing)");
        var (protocol, at2) = TorchPickle.Load(where, prefix, at, NoStorage);
        if (protocol is not 1001L) throw new LlmSnpException($"{where}: legacy protocol version {protocol} is not 1001");
        var (_, at3) = TorchPickle.Load(where, prefix, at2, NoStorage);   // sys_info: byte order and type sizes, checked below by the sizes
        var (root, at4) = TorchPickle.Load(where, prefix, at3, pid => Unify(where, storages, TorchPickle.StorageId(where, pid, legacy: true)));
        var state = TorchPickle.StateDict(where, root);
        var (keysObj, at5) = TorchPickle.Load(where, prefix, at4, NoStorage);
        var keys = TorchPickle.Strings(where, keysObj, "the storage key list");
        var blobs = new Dictionary<string, (long, long)>(StringComparer.Ordinal);
        long pos = at5;
        foreach (var key in keys)
        {
            if (!storages.TryGetValue(key, out var s)) throw new LlmSnpException($"{where}: storage '{key}' is listed but no tensor uses it");
            long numel = (long)f.U64(pos);
            if (numel != s.NumElements) throw new LlmSnpException($"{where}: storage '{key}' holds {numel} elements, its tensors say {s.NumElements}");
            long bytes = checked(numel * SafeDTypes.Size(s.DType));
            if (bytes > f.Length - pos - 8) throw new LlmSnpException($"{where}: storage '{key}' runs past the end of the file (truncated?)");
            if (!blobs.TryAdd(key, (pos + 8, bytes))) throw new LlmSnpException($"{where}: storage '{key}' is listed twice");
            pos += 8 + bytes;
        }
        if (pos != f.Length) throw new LlmSnpException($"{where}: {f.Length - pos} bytes after the last storage");
        return Views(where, state, key => blobs.TryGetValue(key, out var b) ? b : throw new LlmSnpException($"{where}: storage '{key}' is not in the file"));
    }

    // ------------------------------------------------------------------ tensors

    /// <summary>One key names one storage: its dtype and size must agree wherever it is referred to.</summary>
    static TorchStorageRef Unify(string where, Dictionary<string, TorchStorageRef> storages, TorchStorageRef s)
    {
        if (!storages.TryGetValue(s.Key, out var known)) return storages[s.Key] = s;
        if (known != s) throw new LlmSnpException($"{where}: storage '{s.Key}' is referred to as {known.DType}×{known.NumElements} and as {s.DType}×{s.NumElements}");
        return known;
    }

    static (Dictionary<string, TensorEntry>, Dictionary<string, View>) Views(string where, List<KeyValuePair<string, TorchTensorRef>> state, Func<string, (long Offset, long Size)> storage)
    {
        var tensors = new Dictionary<string, TensorEntry>(StringComparer.Ordinal);
        var views = new Dictionary<string, View>(StringComparer.Ordinal);
        foreach (var (name, t) in state)
        {
            var (start, size) = storage(t.Storage.Key);
            long elem = SafeDTypes.Size(t.Storage.DType);
            if (size != t.Storage.NumElements * elem)
                throw new LlmSnpException($"{where}: storage '{t.Storage.Key}' holds {size} bytes, its pickle says {t.Storage.NumElements} {t.Storage.DType} elements");
            long numel = 1, last = t.Offset;
            bool contiguous = true;
            long expectStride = 1;
            try
            {
                for (int d = t.Shape.Length - 1; d >= 0; d--)
                {
                    numel = checked(numel * t.Shape[d]);
                    if (t.Shape[d] > 1 && t.Stride[d] != expectStride) contiguous = false;
                    expectStride = checked(expectStride * t.Shape[d]);
                    last = checked(last + (t.Shape[d] - 1) * t.Stride[d]);
                }
            }
            catch (OverflowException) { throw new LlmSnpException($"{where}: tensor '{name}' has a size or stride that overflows"); }
            if (numel > 0 && (last >= t.Storage.NumElements || t.Offset >= t.Storage.NumElements))
                throw new LlmSnpException($"{where}: tensor '{name}' [{string.Join(", ", t.Shape)}] reaches element {last} of storage '{t.Storage.Key}', which holds {t.Storage.NumElements}");
            long begin = start + t.Offset * elem;
            tensors[name] = new TensorEntry(name, t.Storage.DType, t.Shape, begin, begin + numel * elem);
            views[name] = new View(t, start, contiguous);
        }
        return (tensors, views);
    }

    public Tensor Read(string name) => ReadConverted(name, SafeDTypes.ToTorch(Entry(name).DType));

    public Tensor ReadConverted(string name, ScalarType dtype)
    {
        var t = torch.empty(Entry(name).Shape, dtype);
        try { ReadInto(name, t); }
        catch { t.Dispose(); throw; }
        return t;
    }

    TensorEntry Entry(string name) => Tensors.TryGetValue(name, out var e) ? e : throw new LlmSnpException($"{Path}: no tensor '{name}'");

    public unsafe void ReadInto(string name, Tensor destination)
    {
        var e = Entry(name);
        if (!destination.shape.SequenceEqual(e.Shape) || !destination.is_contiguous() || destination.device_type != DeviceType.CPU)
            throw new ArgumentException($"{name}: destination [{string.Join(", ", destination.shape)}] is not a contiguous CPU tensor of the stored shape", nameof(destination));
        if (e.ByteLength == 0) return;
        var v = _views[name];
        byte* basePtr = null;
        _view!.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            byte* file = basePtr + _view.PointerOffset;
            if (v.Contiguous)
            {
                MappedBytes.CopyInto(file + e.Begin, e.DType, e.ByteLength, destination);
                return;
            }
            // A strided view (a transposed or sliced tensor saved as is): copy the span of storage it covers, then gather.
            long last = v.Ref.Offset + v.Ref.Shape.Select((s, d) => (s - 1) * v.Ref.Stride[d]).Sum();
            long elem = SafeDTypes.Size(e.DType);
            using var span = torch.empty(last - v.Ref.Offset + 1, SafeDTypes.ToTorch(e.DType));
            MappedBytes.CopyInto(file + e.Begin, e.DType, span.numel() * elem, span);
            using var gathered = span.as_strided(v.Ref.Shape, v.Ref.Stride, 0);
            destination.copy_(gathered);
        }
        finally { _view.SafeMemoryMappedViewHandle.ReleasePointer(); }
    }

    public bool SameStorage(string a, string b) =>
        _views.TryGetValue(a, out var x) && _views.TryGetValue(b, out var y) && x.Ref.Storage == y.Ref.Storage && x.Ref.Offset == y.Ref.Offset
        && x.Ref.Shape.SequenceEqual(y.Ref.Shape) && x.Ref.Stride.SequenceEqual(y.Ref.Stride);

    public void Dispose()
    {
        _view?.Dispose();
        _map?.Dispose();
    }
}
