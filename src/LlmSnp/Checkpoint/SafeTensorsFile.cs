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
public sealed class SafeTensorsFile : IDisposable
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
        if (!File.Exists(path)) throw new LlmSnpException($"{path}: file not found");
        long fileLength = new FileInfo(path).Length;
        if (fileLength < 8) throw new LlmSnpException($"{path}: not a safetensors file ({fileLength} bytes, shorter than the 8-byte header length)");
        byte[] headerBytes;
        using (var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read))
        {
            Span<byte> lenBytes = stackalloc byte[8];
            fs.ReadExactly(lenBytes);
            ulong n = BitConverter.ToUInt64(lenBytes);
            if (n > MaxHeaderBytes) throw new LlmSnpException($"{path}: header length {n} exceeds the {MaxHeaderBytes}-byte limit");
            if ((long)n > fileLength - 8) throw new LlmSnpException($"{path}: header length {n} runs past the end of the file ({fileLength} bytes)");
            headerBytes = new byte[n];
            fs.ReadExactly(headerBytes);
        }
        long dataStart = 8 + headerBytes.Length;
        long bufferLength = fileLength - dataStart;
        var (tensors, metadata) = ParseHeader(path, headerBytes, bufferLength);
        MemoryMappedFile? map = null; MemoryMappedViewAccessor? view = null;
        if (bufferLength > 0)
        {
            map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            view = map.CreateViewAccessor(0, fileLength, MemoryMappedFileAccess.Read);
        }
        return new SafeTensorsFile(path, tensors, metadata, map, view, dataStart);
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
    public unsafe Tensor Read(string name)
    {
        if (!Tensors.TryGetValue(name, out var e)) throw new LlmSnpException($"{Path}: no tensor '{name}'");
        var t = torch.empty(e.Shape, SafeDTypes.ToTorch(e.DType));
        if (e.ByteLength == 0) return t;
        byte* basePtr = null;
        _view!.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            byte* src = basePtr + _view.PointerOffset + _dataStart + e.Begin;
            new ReadOnlySpan<byte>(src, checked((int)e.ByteLength)).CopyTo(t.bytes);   // bytes is a view of the tensor's storage
        }
        finally { _view.SafeMemoryMappedViewHandle.ReleasePointer(); }
        return t;
    }

    public void Dispose()
    {
        _view?.Dispose();
        _map?.Dispose();
    }
}
