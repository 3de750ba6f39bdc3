using System.Buffers.Binary;
using System.Text;

namespace LlmSnp.Export;

/// <summary>GGUF metadata value types (the numbers are the file format's).</summary>
public enum GgufValueType : uint
{
    UInt8 = 0, Int8 = 1, UInt16 = 2, Int16 = 3, UInt32 = 4, Int32 = 5, Float32 = 6, Bool = 7,
    String = 8, Array = 9, UInt64 = 10, Int64 = 11, Float64 = 12,
}

/// <summary>The ggml tensor types this writer emits (the numbers are ggml's).</summary>
public enum GgmlType : uint { F32 = 0, F16 = 1 }

/// <summary>
/// A small, strict GGUF v3 writer: header, metadata, tensor infos, then tensor data, all
/// little-endian, every tensor's data at a multiple of <see cref="Alignment"/> from the start of
/// the data section (which itself starts aligned). Tensor bytes are produced lazily, one tensor at
/// a time, so a checkpoint never has to sit in memory whole; the writer checks each producer wrote
/// exactly the bytes its shape and type call for.
/// </summary>
public sealed class GgufWriter
{
    public const uint Magic = 0x46554747;   // "GGUF" read as a little-endian uint32
    public const uint Version = 3;
    public const int Alignment = 32;        // llama.cpp's default (general.alignment), written explicitly
    /// <summary>ggml's GGML_MAX_NAME is 64 bytes including the terminating NUL.</summary>
    public const int MaxTensorName = 63;
    const int MaxDims = 4;                  // GGML_MAX_DIMS

    readonly List<(string Key, GgufValueType Type, GgufValueType ElemType, object Value)> _kv = new();
    readonly HashSet<string> _keys = new(StringComparer.Ordinal);
    readonly List<Tensor> _tensors = new();
    readonly HashSet<string> _names = new(StringComparer.Ordinal);

    sealed record Tensor(string Name, long[] Ne, GgmlType Type, long Bytes, Action<Stream> Write);

    public GgufWriter() => AddUInt32("general.alignment", Alignment);

    public int TensorCount => _tensors.Count;
    public int KeyCount => _kv.Count;

    void AddKv(string key, GgufValueType type, GgufValueType elem, object value)
    {
        if (string.IsNullOrEmpty(key)) throw new ArgumentException("GGUF key is empty");
        if (!_keys.Add(key)) throw new ArgumentException($"GGUF key '{key}' added twice");
        _kv.Add((key, type, elem, value));
    }

    public void AddUInt32(string key, uint v) => AddKv(key, GgufValueType.UInt32, 0, v);
    public void AddInt32(string key, int v) => AddKv(key, GgufValueType.Int32, 0, v);
    public void AddFloat32(string key, float v) => AddKv(key, GgufValueType.Float32, 0, v);
    public void AddBool(string key, bool v) => AddKv(key, GgufValueType.Bool, 0, v);
    public void AddString(string key, string v) => AddKv(key, GgufValueType.String, 0, v);
    public void AddInt32Array(string key, IReadOnlyList<int> v) => AddKv(key, GgufValueType.Array, GgufValueType.Int32, v.ToArray());
    public void AddFloat32Array(string key, IReadOnlyList<float> v) => AddKv(key, GgufValueType.Array, GgufValueType.Float32, v.ToArray());
    public void AddStringArray(string key, IReadOnlyList<string> v) => AddKv(key, GgufValueType.Array, GgufValueType.String, v.ToArray());

    /// <summary>Bytes one tensor of this shape and type occupies.</summary>
    public static long ByteSize(IReadOnlyList<long> shape, GgmlType type) =>
        shape.Aggregate(1L, (a, b) => checked(a * b)) * (type == GgmlType.F32 ? 4 : 2);

    /// <summary>
    /// Declares a tensor. <paramref name="shape"/> is in PyTorch order (outermost first); GGUF stores
    /// ggml's ne[], innermost first, so it is reversed here. <paramref name="write"/> is called once,
    /// during <see cref="Write"/>, and must write the row-major little-endian data.
    /// </summary>
    public void AddTensor(string name, IReadOnlyList<long> shape, GgmlType type, Action<Stream> write)
    {
        if (string.IsNullOrEmpty(name) || Encoding.UTF8.GetByteCount(name) > MaxTensorName)
            throw new ArgumentException($"tensor name '{name}' is empty or longer than {MaxTensorName} bytes");
        if (shape.Count is < 1 or > MaxDims) throw new ArgumentException($"tensor '{name}': {shape.Count} dimensions (1 to {MaxDims})");
        if (shape.Any(d => d < 1)) throw new ArgumentException($"tensor '{name}': a dimension below 1");
        if (!_names.Add(name)) throw new ArgumentException($"tensor '{name}' added twice");
        _tensors.Add(new Tensor(name, shape.Reverse().ToArray(), type, ByteSize(shape, type), write));
    }

    static long Pad(long x) => (x + Alignment - 1) / Alignment * Alignment;

    /// <summary>Writes the whole file to a seekable stream positioned at 0; returns the bytes written.</summary>
    public long Write(Stream s)
    {
        if (!s.CanSeek) throw new ArgumentException("GGUF output stream must be seekable");
        var w = new BinaryWriter(s, Encoding.UTF8, leaveOpen: true);   // BinaryWriter is little-endian on every platform
        w.Write(Magic);
        w.Write(Version);
        w.Write((ulong)_tensors.Count);
        w.Write((ulong)_kv.Count);
        foreach (var (key, type, elem, value) in _kv)
        {
            WriteString(w, key);
            w.Write((uint)type);
            switch (type)
            {
                case GgufValueType.UInt32: w.Write((uint)value); break;
                case GgufValueType.Int32: w.Write((int)value); break;
                case GgufValueType.Float32: w.Write((float)value); break;
                case GgufValueType.Bool: w.Write((byte)((bool)value ? 1 : 0)); break;
                case GgufValueType.String: WriteString(w, (string)value); break;
                case GgufValueType.Array:
                    w.Write((uint)elem);
                    switch (value)
                    {
                        case int[] a: w.Write((ulong)a.Length); foreach (var x in a) w.Write(x); break;
                        case float[] a: w.Write((ulong)a.Length); foreach (var x in a) w.Write(x); break;
                        case string[] a: w.Write((ulong)a.Length); foreach (var x in a) WriteString(w, x); break;
                        default: throw new InvalidOperationException("unsupported GGUF array");
                    }
                    break;
                default: throw new InvalidOperationException($"unsupported GGUF type {type}");
            }
        }
        long offset = 0;
        foreach (var t in _tensors)
        {
            WriteString(w, t.Name);
            w.Write((uint)t.Ne.Length);
            foreach (var d in t.Ne) w.Write((ulong)d);
            w.Write((uint)t.Type);
            w.Write((ulong)offset);   // relative to the start of the data section
            offset = Pad(offset + t.Bytes);
        }
        w.Flush();
        long dataStart = Pad(s.Position);
        WriteZeros(s, dataStart - s.Position);
        foreach (var t in _tensors)
        {
            long start = s.Position;
            t.Write(s);
            long written = s.Position - start;
            if (written != t.Bytes) throw new InvalidOperationException($"tensor '{t.Name}': wrote {written} bytes, expected {t.Bytes}");
            WriteZeros(s, Pad(written) - written);
        }
        return s.Position;
    }

    static void WriteString(BinaryWriter w, string v)
    {
        // GGUF strings: uint64 byte length, then UTF-8 bytes without a terminator.
        var bytes = Encoding.UTF8.GetBytes(v);
        w.Write((ulong)bytes.Length);
        w.Write(bytes);
    }

    static void WriteZeros(Stream s, long n)
    {
        Span<byte> zeros = stackalloc byte[Alignment];
        zeros.Clear();
        while (n > 0) { int k = (int)Math.Min(n, zeros.Length); s.Write(zeros[..k]); n -= k; }
    }

    /// <summary>Writes a float array as little-endian float32 bytes.</summary>
    public static void WriteF32(Stream s, ReadOnlySpan<float> data)
    {
        if (BitConverter.IsLittleEndian) { s.Write(System.Runtime.InteropServices.MemoryMarshal.AsBytes(data)); return; }
        var buf = new byte[4];
        foreach (var x in data) { BinaryPrimitives.WriteSingleLittleEndian(buf, x); s.Write(buf); }
    }
}
