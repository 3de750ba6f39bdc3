using System.IO.MemoryMappedFiles;
using System.Text;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

/// <summary>Where one tensor lives inside a safetensors file.</summary>
public sealed record TensorEntry(string Name, SafeDType DType, long[] Shape, long Begin, long End)
{
    public long NumElements => Shape.Aggregate(1L, (a, b) => a * b);
    public long ByteLength => End - Begin;
}

/// <summary>
/// A strictly validated, memory-mapped safetensors file. The header is parsed and checked once;
/// tensor bytes are copied out of the map only when a tensor is read, so reading one block's
/// tensors touches only that block's pages.
/// </summary>
public sealed class SafeTensorsFile : ITensorFile
{
    /// <summary>The reference implementation's bound; checked before anything is allocated.</summary>
    public const long MaxHeaderBytes = 100_000_000;
    const int MaxJsonDepth = 16;

    public string Path { get; }
    public IReadOnlyDictionary<string, TensorEntry> Tensors { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }
    readonly MemoryMappedFile? _map;
    readonly MemoryMappedViewAccessor? _view;
    readonly long _dataStart;

    SafeTensorsFile(string path, Dictionary<string, TensorEntry> tensors, Dictionary<string, string> metadata,
        MemoryMappedFile? map, MemoryMappedViewAccessor? view, long dataStart)
    {
        Path = path; Tensors = tensors; Metadata = metadata; _map = map; _view = view; _dataStart = dataStart;
    }

    public static SafeTensorsFile Open(string path)
    {
        if (Directory.Exists(path)) throw new LlmSnpException($"{path}: is a directory, not a safetensors file");
        if (!File.Exists(path)) throw Missing(path);
        // Everything is measured and mapped through one open handle: it follows symbolic links (the
        // HF hub cache links snapshots/<rev>/*.safetensors to blobs/<hash>), whereas FileInfo.Length
        // measures the link itself, and the file cannot be swapped between the checks and the map.
        FileStream fs;
        try { fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1); }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException) { throw Missing(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new LlmSnpException($"{path}: cannot open ({e.Message})", e); }
        bool handedOver = false;
        try
        {
            long fileLength = fs.Length;
            if (fileLength < 8) throw new LlmSnpException($"{path}: not a safetensors file ({fileLength} bytes, shorter than the 8-byte header length)");
            Span<byte> lenBytes = stackalloc byte[8];
            fs.ReadExactly(lenBytes);
            ulong n = BitConverter.ToUInt64(lenBytes);
            if (n > MaxHeaderBytes) throw new LlmSnpException($"{path}: header length {n} exceeds the {MaxHeaderBytes}-byte limit");
            if ((long)n > fileLength - 8) throw new LlmSnpException($"{path}: header length {n} runs past the end of the file ({fileLength} bytes)");
            var headerBytes = new byte[n];
            fs.ReadExactly(headerBytes);
            long dataStart = 8 + headerBytes.Length;
            long bufferLength = fileLength - dataStart;
            var (tensors, metadata) = ParseHeader(path, headerBytes, bufferLength);
            MemoryMappedFile? map = null; MemoryMappedViewAccessor? view = null;
            if (bufferLength > 0)
            {
                map = MemoryMappedFile.CreateFromFile(fs, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: false);
                handedOver = true;   // the map owns the handle now
                view = map.CreateViewAccessor(0, fileLength, MemoryMappedFileAccess.Read);
            }
            return new SafeTensorsFile(path, tensors, metadata, map, view, dataStart);
        }
        finally { if (!handedOver) fs.Dispose(); }
    }

    /// <summary>File.Exists is true for a symbolic link whose target is gone (a hub-cache blob deleted): say which it is.</summary>
    static LlmSnpException Missing(string path)
    {
        string? target = null;
        try { target = new FileInfo(path).LinkTarget; }
        catch (Exception e) when (e is ArgumentException or IOException or UnauthorizedAccessException) { }   // a name no file can have
        return new LlmSnpException(target != null ? $"{path}: broken symbolic link (target {target} not found)" : $"{path}: file not found");
    }

    static (Dictionary<string, TensorEntry>, Dictionary<string, string>) ParseHeader(string path, byte[] header, long bufferLength)
    {
        // The JSON reader does not validate UTF-8 inside strings it is never asked to decode: check it all.
        if (!System.Text.Unicode.Utf8.IsValid(header)) throw new LlmSnpException($"{path}: header is not valid UTF-8 JSON");
        JsonDocument doc;
        try
        {
            // Depth is bounded so hostile nesting cannot exhaust the stack.
            doc = JsonDocument.Parse(header, new JsonDocumentOptions { MaxDepth = MaxJsonDepth });
        }
        catch (JsonException e)
        {
            throw new LlmSnpException($"{path}: header is not valid JSON ({FirstLine(e.Message)})");
        }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new LlmSnpException($"{path}: header is not a JSON object");
            var tensors = new Dictionary<string, TensorEntry>(StringComparer.Ordinal);
            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            bool sawMetadata = false;
            foreach (var prop in root.EnumerateObject())
            {
                string name = prop.Name;
                if (name == "__metadata__")
                {
                    if (sawMetadata) throw new LlmSnpException($"{path}: duplicate __metadata__");
                    sawMetadata = true;
                    if (prop.Value.ValueKind != JsonValueKind.Object) throw new LlmSnpException($"{path}: __metadata__ is not an object");
                    foreach (var m in prop.Value.EnumerateObject())
                    {
                        if (m.Value.ValueKind != JsonValueKind.String) throw new LlmSnpException($"{path}: __metadata__ value '{m.Name}' is not a string");
                        if (!metadata.TryAdd(m.Name, m.Value.GetString()!)) throw new LlmSnpException($"{path}: duplicate __metadata__ key '{m.Name}'");
                    }
                    continue;
                }
                if (tensors.ContainsKey(name)) throw new LlmSnpException($"{path}: duplicate tensor name '{name}'");
                tensors[name] = ParseEntry(path, name, prop.Value);
            }
            CheckLayout(path, tensors.Values, bufferLength);
            return (tensors, metadata);
        }
    }

    static TensorEntry ParseEntry(string path, string name, JsonElement e)
    {
        string where = $"{path}: tensor '{name}'";
        if (e.ValueKind != JsonValueKind.Object) throw new LlmSnpException($"{where}: entry is not an object");
        if (!e.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String) throw new LlmSnpException($"{where}: missing or non-string dtype");
        var dtype = SafeDTypes.Parse(dt.GetString()!, where);
        if (!e.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array) throw new LlmSnpException($"{where}: missing or non-array shape");
        var shape = new long[sh.GetArrayLength()];
        int i = 0;
        foreach (var d in sh.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long v) || v < 0) throw new LlmSnpException($"{where}: shape has a non-integer or negative dimension");
            shape[i++] = v;
        }
        if (!e.TryGetProperty("data_offsets", out var off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2)
            throw new LlmSnpException($"{where}: data_offsets is not a [begin, end] pair");
        long begin = ReadOffset(off[0], where), end = ReadOffset(off[1], where);
        if (end < begin) throw new LlmSnpException($"{where}: data_offsets end {end} is before begin {begin}");
        long numel = 1;
        try { foreach (var d in shape) numel = checked(numel * d); }
        catch (OverflowException) { throw new LlmSnpException($"{where}: shape element count overflows"); }
        long expected;
        try { expected = checked(numel * SafeDTypes.Size(dtype)); }
        catch (OverflowException) { throw new LlmSnpException($"{where}: byte size overflows"); }
        if (expected != end - begin)
            throw new LlmSnpException($"{where}: {end - begin} bytes in data_offsets but shape [{string.Join(", ", shape)}] of {dtype} needs {expected}");
        return new TensorEntry(name, dtype, shape, begin, end);
    }

    static long ReadOffset(JsonElement v, string where)
    {
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt64(out long x) || x < 0) throw new LlmSnpException($"{where}: data_offsets holds a non-integer or negative value");
        return x;
    }

    static void CheckLayout(string path, IEnumerable<TensorEntry> entries, long bufferLength)
    {
        // Zero-byte tensors may share an offset; every other byte of the buffer belongs to exactly one tensor.
        long cursor = 0;
        foreach (var t in entries.OrderBy(t => t.Begin).ThenBy(t => t.End))
        {
            if (t.Begin < cursor) throw new LlmSnpException($"{path}: tensor '{t.Name}' overlaps the previous tensor (begins at {t.Begin}, previous ends at {cursor})");
            if (t.Begin > cursor) throw new LlmSnpException($"{path}: gap in the data buffer before tensor '{t.Name}' (bytes {cursor}..{t.Begin})");
            cursor = t.End;
        }
        if (cursor != bufferLength)
            throw new LlmSnpException($"{path}: tensors cover {cursor} bytes but the data buffer holds {bufferLength}");
    }

    static string FirstLine(string s) => s.Split('\n')[0].Trim();

    /// <summary>Reads one tensor in its stored dtype, on the CPU.</summary>
    public Tensor Read(string name)
    {
        if (!Tensors.TryGetValue(name, out var e)) throw new LlmSnpException($"{Path}: no tensor '{name}'");
        return ReadConverted(name, SafeDTypes.ToTorch(e.DType));
    }

    /// <summary>
    /// Reads one tensor converted to <paramref name="dtype"/>, on the CPU, a MiB of stored bytes at a time:
    /// the stored-dtype copy never exists whole (a llama3-8b block's F16 weights are 436 MB of fresh pages
    /// that the kernel would zero for one pass). Values equal reading, then <c>to(dtype)</c> (the same conversion).
    /// </summary>
    public Tensor ReadConverted(string name, ScalarType dtype)
    {
        if (!Tensors.TryGetValue(name, out var e)) throw new LlmSnpException($"{Path}: no tensor '{name}'");
        var t = torch.empty(e.Shape, dtype);
        try { ReadInto(name, t); }
        catch { t.Dispose(); throw; }
        return t;
    }

    /// <summary>Reads one tensor into a contiguous CPU tensor of its shape (any dtype: converted as <c>to</c> converts), overwriting it.</summary>
    public unsafe void ReadInto(string name, Tensor destination)
    {
        if (!Tensors.TryGetValue(name, out var e)) throw new LlmSnpException($"{Path}: no tensor '{name}'");
        if (!destination.shape.SequenceEqual(e.Shape) || !destination.is_contiguous() || destination.device_type != DeviceType.CPU)
            throw new ArgumentException($"{name}: destination [{string.Join(", ", destination.shape)}] is not a contiguous CPU tensor of the stored shape", nameof(destination));
        if (e.ByteLength == 0) return;
        byte* basePtr = null;
        _view!.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try { MappedBytes.CopyInto(basePtr + _view.PointerOffset + _dataStart + e.Begin, e.DType, e.ByteLength, destination); }
        finally { _view.SafeMemoryMappedViewHandle.ReleasePointer(); }
    }

    /// <summary>Each name has its own bytes in a safetensors file (overlaps are refused).</summary>
    public bool SameStorage(string a, string b) => false;

    public void Dispose()
    {
        _view?.Dispose();
        _map?.Dispose();
    }
}

/// <summary>Copies stored tensor bytes from a mapped file into a tensor, converting a MiB of stored bytes at a time.</summary>
static class MappedBytes
{
    /// <summary>Bytes of the stored dtype converted at a time: below glibc's mmap threshold, so the staging buffer is heap memory reused from call to call.</summary>
    const long StagingBytes = 1 << 20;

    /// <summary>
    /// <paramref name="byteLength"/> bytes of <paramref name="stored"/> elements at <paramref name="src"/> into a contiguous CPU
    /// tensor of as many elements (any dtype: converted as <c>to</c> converts). The stored-dtype copy never exists whole.
    /// </summary>
    public static unsafe void CopyInto(byte* src, SafeDType storedDType, long byteLength, Tensor destination)
    {
        var stored = SafeDTypes.ToTorch(storedDType);
        if (stored == destination.dtype)
        {
            TensorBytes.Chunked(destination, (offset, dst) => new ReadOnlySpan<byte>(src + offset, dst.Length).CopyTo(dst));
            return;
        }
        long elem = SafeDTypes.Size(storedDType), numel = byteLength / elem, per = Math.Max(1, StagingBytes / elem);
        using var staging = torch.empty(Math.Min(per, numel), stored);
        using var flat = destination.view(-1);
        for (long i = 0; i < numel; i += per)
        {
            long n = Math.Min(per, numel - i);
            using var from = staging.narrow(0, 0, n);
            new ReadOnlySpan<byte>(src + i * elem, checked((int)(n * elem))).CopyTo(from.bytes);
            using var to = flat.narrow(0, i, n);
            to.copy_(from);
        }
    }
}

/// <summary>
/// A CPU tensor's bytes as spans of at most <see cref="MaxChunkBytes"/>. TorchSharp's
/// <c>Tensor.bytes</c> casts the byte count to int unchecked, so one span over a tensor of 2 GiB
/// or more (a 128256 × 8192 F16 embedding is 2.1 GB) is wrong or throws; a narrowed view of the
/// flattened tensor starts at its own offset, so each chunk is an exact span.
/// </summary>
public static class TensorBytes
{
    public const long MaxChunkBytes = 1L << 30;

    /// <summary>Calls <paramref name="visit"/> with (byte offset, span) for consecutive pieces of a contiguous CPU tensor.</summary>
    public static void Chunked(Tensor contiguous, SpanVisitor visit, long maxChunkBytes = MaxChunkBytes)
    {
        long numel = contiguous.numel();
        if (numel == 0) return;
        long elem = contiguous.ElementSize;
        long perChunk = Math.Max(1, maxChunkBytes / elem);
        using var flat = contiguous.view(-1);
        for (long i = 0; i < numel; i += perChunk)
        {
            long n = Math.Min(perChunk, numel - i);
            using var piece = flat.narrow(0, i, n);
            var span = piece.bytes;
            if (span.Length != n * elem) throw new InvalidOperationException($"tensor chunk of {n * elem} bytes came back as {span.Length}");
            visit(i * elem, span);
        }
    }

    public delegate void SpanVisitor(long offset, Span<byte> bytes);
}
