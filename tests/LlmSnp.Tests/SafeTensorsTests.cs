using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// The safetensors reader and writer: bit-exact round trips for every dtype, the on-disk layout
/// (checked by parsing the bytes independently), sharding, every header validation rule, sharded
/// index errors and the writer's temporary files.
/// </summary>
public sealed class SafeTensorsTests : IDisposable
{
    readonly string _dir;

    public SafeTensorsTests()
    {
        _dir = Path.Combine(Path.GetTempPath(), "llmsnp-st-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(_dir);
    }

    public void Dispose()
    {
        try { Directory.Delete(_dir, true); } catch (IOException) { }
    }

    // ---------------------------------------------------------------- helpers

    /// <summary>One tensor of every storable dtype, with extreme values, plus a rank-0 and a 0-element tensor.</summary>
    static List<(string Name, Tensor Tensor)> AllDTypes()
    {
        var gen = new torch.Generator(42);
        var special = new float[] { 0f, -0f, 1f, -1f, float.PositiveInfinity, float.NegativeInfinity, float.NaN, 65504f, 1e-8f, 3.14159f, -2.5e10f, 6.1e-5f };
        var specialD = new double[] { 0d, -0d, 1d, -1d, double.PositiveInfinity, double.NegativeInfinity, double.NaN, double.MaxValue, double.Epsilon, Math.PI, -1e300, 1e-310 };
        return new()
        {
            ("f64", torch.cat(new[] { torch.tensor(specialD), torch.randn(new long[] { 20 }, ScalarType.Float64, generator: gen) }).reshape(4, 8)),
            ("f32", torch.cat(new[] { torch.tensor(special), torch.randn(new long[] { 12 }, ScalarType.Float32, generator: gen) }).reshape(2, 3, 4)),
            ("f16", torch.cat(new[] { torch.tensor(special), torch.randn(new long[] { 8 }, ScalarType.Float32, generator: gen) }).to(ScalarType.Float16).reshape(5, 4)),
            ("bf16", torch.cat(new[] { torch.tensor(special), torch.randn(new long[] { 3 }, ScalarType.Float32, generator: gen) }).to(ScalarType.BFloat16).reshape(3, 5)),
            ("i64", torch.tensor(new long[] { long.MinValue, -1, 0, 1, long.MaxValue, 123456789012345 }, new long[] { 2, 3 })),
            ("i32", torch.tensor(new int[] { int.MinValue, -1, 0, 1, int.MaxValue, 7, -7 }, new long[] { 7 })),
            ("i16", torch.tensor(new long[] { short.MinValue, -1, 0, 1, short.MaxValue, 300 }, new long[] { 3, 2 }).to(ScalarType.Int16)),
            ("i8", torch.tensor(new long[] { sbyte.MinValue, -1, 0, 1, sbyte.MaxValue }, new long[] { 5, 1 }).to(ScalarType.Int8)),
            ("u8", torch.tensor(new long[] { 0, 1, 127, 128, 254, 255 }, new long[] { 1, 6 }).to(ScalarType.Byte)),
            ("bool", torch.tensor(new bool[] { true, false, false, true, true }, new long[] { 5 })),
            ("scalar", torch.tensor(2.75f)),
            ("empty", torch.zeros(new long[] { 0, 3 }, ScalarType.Float32)),
            ("scalar_i64", torch.tensor(-42L)),
            ("empty_bf16", torch.zeros(new long[] { 4, 0 }, ScalarType.BFloat16)),
        };
    }

    static readonly Dictionary<string, SafeDType> ExpectedDType = new()
    {
        ["f64"] = SafeDType.F64, ["f32"] = SafeDType.F32, ["f16"] = SafeDType.F16, ["bf16"] = SafeDType.BF16,
        ["i64"] = SafeDType.I64, ["i32"] = SafeDType.I32, ["i16"] = SafeDType.I16, ["i8"] = SafeDType.I8,
        ["u8"] = SafeDType.U8, ["bool"] = SafeDType.BOOL, ["scalar"] = SafeDType.F32, ["empty"] = SafeDType.F32,
        ["scalar_i64"] = SafeDType.I64, ["empty_bf16"] = SafeDType.BF16,
    };

    static byte[] Bytes(Tensor t)
    {
        using var c = t.contiguous();
        return c.numel() == 0 ? Array.Empty<byte>() : c.bytes.ToArray();
    }

    /// <summary>Same dtype, same shape, same bytes (NaN payloads and -0 included).</summary>
    static void AssertBitEqual(Tensor expected, Tensor actual, string name)
    {
        Assert.True(expected.dtype == actual.dtype, $"{name}: dtype {actual.dtype}, expected {expected.dtype}");
        Assert.True(expected.shape.SequenceEqual(actual.shape), $"{name}: shape [{string.Join(",", actual.shape)}], expected [{string.Join(",", expected.shape)}]");
        Assert.True(Bytes(expected).AsSpan().SequenceEqual(Bytes(actual)), $"{name}: bytes differ");
    }

    /// <summary>Writes [u64 little-endian header length][header][data] to a fresh file.</summary>
    string RawBytes(byte[] header, byte[]? data = null, string name = "raw.safetensors")
    {
        string path = Path.Combine(_dir, name);
        using var fs = File.Create(path);
        Span<byte> len = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)header.Length);
        fs.Write(len);
        fs.Write(header);
        if (data != null) fs.Write(data);
        return path;
    }

    string Raw(string header, int dataBytes = 0, string name = "raw.safetensors") =>
        RawBytes(Encoding.UTF8.GetBytes(header), new byte[dataBytes], name);

    static string Entry(string dtype, string shape, string offsets) =>
        $"{{\"dtype\":\"{dtype}\",\"shape\":{shape},\"data_offsets\":{offsets}}}";

    /// <summary>Open must fail with a one-line LlmSnpException naming the file and everything in <paramref name="mentions"/>.</summary>
    static LlmSnpException Rejects(string path, params string[] mentions)
    {
        var e = Assert.Throws<LlmSnpException>(() => { using var f = SafeTensorsFile.Open(path); });
        Assert.Contains(path, e.Message);
        foreach (var m in mentions) Assert.Contains(m, e.Message);
        Assert.DoesNotContain('\n', e.Message);
        return e;
    }

    static (long HeaderLength, JsonDocument Header, long FileLength) ParseIndependently(string path)
    {
        byte[] all = File.ReadAllBytes(path);
        long n = (long)BinaryPrimitives.ReadUInt64LittleEndian(all.AsSpan(0, 8));
        return (n, JsonDocument.Parse(all.AsMemory(8, (int)n)), all.Length);
    }

    // ---------------------------------------------------------------- 1. round trips

    [Fact]
    public void RoundTrip_EveryDType_IsBitExact()
    {
        var tensors = AllDTypes();
        var written = SafeTensorsWriter.WriteAll(_dir, tensors);
        Assert.Equal(new[] { SafeTensorsWriter.SingleFileName }, written);

        using var f = SafeTensorsFile.Open(Path.Combine(_dir, SafeTensorsWriter.SingleFileName));
        Assert.Equal(tensors.Select(t => t.Name).OrderBy(n => n, StringComparer.Ordinal), f.Tensors.Keys.OrderBy(n => n, StringComparer.Ordinal));
        Assert.Equal("pt", f.Metadata["format"]);
        foreach (var (name, t) in tensors)
        {
            Assert.Equal(ExpectedDType[name], f.Tensors[name].DType);
            Assert.Equal(t.shape, f.Tensors[name].Shape);
            using var back = f.Read(name);
            AssertBitEqual(t, back, name);
        }
        // The values, not only the bytes.
        using var i64 = f.Read("i64");
        Assert.True(torch.eq(tensors.Single(t => t.Name == "i64").Tensor, i64).all().item<bool>());
        using var b = f.Read("bool");
        Assert.Equal(new[] { true, false, false, true, true }, b.data<bool>().ToArray());
        using var s = f.Read("scalar");
        Assert.Empty(s.shape);
        Assert.Equal(2.75f, s.item<float>());
        Assert.Equal(-42L, f.Read("scalar_i64").item<long>());
        using var e = f.Read("empty");
        Assert.Equal(new long[] { 0, 3 }, e.shape);
        Assert.Equal(0, f.Tensors["empty"].ByteLength);
    }

    [Fact]
    public void RoundTrip_ThroughCheckpointReader_KeepsStoredDType()
    {
        var tensors = AllDTypes();
        SafeTensorsWriter.WriteAll(_dir, tensors);
        using var r = new CheckpointReader(_dir);
        Assert.Equal(tensors.Count, r.Names.Count());
        foreach (var (name, t) in tensors)
        {
            using var back = r.Read(name, t.dtype, CPU);
            AssertBitEqual(t, back, name);
        }
    }

    [Fact]
    public void ReadConverted_equals_reading_whole_then_converting_across_staging_chunks()
    {
        // 1.5 Mi F16/BF16 elements: three 1 MiB staging chunks, the last one partial; every dtype as well.
        var gen = new torch.Generator(5);
        var big = torch.randn(new long[] { 1536, 1025 }, generator: gen) * 100;
        var tensors = AllDTypes();
        tensors.Add(("big_f16", big.to(ScalarType.Float16)));
        tensors.Add(("big_bf16", big.to(ScalarType.BFloat16)));
        SafeTensorsWriter.WriteAll(_dir, tensors);
        using var f = SafeTensorsFile.Open(Path.Combine(_dir, SafeTensorsWriter.SingleFileName));
        foreach (var (name, t) in tensors)
            foreach (var to in new[] { ScalarType.Float32, ScalarType.Float64, t.dtype })
            {
                if (t.dtype == ScalarType.Bool && to != ScalarType.Bool) continue;
                using var whole = f.Read(name);
                using var expected = whole.to(to);
                using var converted = f.ReadConverted(name, to);
                AssertBitEqual(expected, converted, $"{name} as {to}");
            }
    }

    [Fact]
    public void Recycled_tensors_are_overwritten_by_the_next_read_of_their_shape_and_nothing_else_is_kept()
    {
        var gen = new torch.Generator(9);
        var tensors = new List<(string, Tensor)>
        {
            ("a0", torch.randn(new long[] { 700, 800 }, generator: gen).to(ScalarType.Float16)),
            ("a1", torch.randn(new long[] { 700, 800 }, generator: gen).to(ScalarType.Float16)),
            ("b0", torch.randn(new long[] { 30, 40 }, generator: gen)),
        };
        SafeTensorsWriter.WriteAll(_dir, tensors);
        using var r = new CheckpointReader(_dir);
        var t0 = r.Read("a0", ScalarType.Float32, CPU);
        r.Recycle(new[] { t0 });
        var t1 = r.Read("a1", ScalarType.Float32, CPU);
        Assert.Same(t0, t1);   // the buffer was reused ...
        using (var fresh = tensors[1].Item2.to(ScalarType.Float32)) AssertBitEqual(fresh, t1, "a1 read into a recycled buffer");   // ... and fully overwritten

        // A tensor the reader did not return (a view, a derived tensor) is disposed, never reused.
        var foreign = torch.zeros(700, 800);
        r.Recycle(new[] { foreign });
        Assert.True(foreign.IsInvalid);
        var t2 = r.Read("a0", ScalarType.Float32, CPU);
        Assert.NotSame(foreign, t2);

        // What the next reads do not claim is released by the next call, an empty one included.
        r.Recycle(new[] { t2 });
        using var other = r.Read("b0", ScalarType.Float32, CPU);
        Assert.NotSame(t2, other);
        Assert.False(t2.IsInvalid);
        r.Recycle(Array.Empty<Tensor>());
        Assert.True(t2.IsInvalid);
        t1.Dispose();
    }

    [Fact]
    public void RoundTrip_NonContiguousInput_IsWrittenInLogicalOrder()
    {
        var t = torch.arange(12, ScalarType.Float32).reshape(3, 4);
        var transposed = t.t();   // a strided view
        Assert.False(transposed.is_contiguous());
        SafeTensorsWriter.WriteAll(_dir, new[] { ("t", transposed) });
        using var f = SafeTensorsFile.Open(Path.Combine(_dir, SafeTensorsWriter.SingleFileName));
        using var back = f.Read("t");
        Assert.Equal(new long[] { 4, 3 }, back.shape);
        Assert.True(torch.eq(transposed, back).all().item<bool>());
    }

    [Fact]
    public void Writer_RejectsDuplicateNames()
    {
        using var w = new SafeTensorsWriter(_dir);
        w.Add("a", torch.zeros(2));
        var e = Assert.Throws<LlmSnpException>(() => w.Add("a", torch.zeros(2)));
        Assert.Contains("'a'", e.Message);
    }

    // ---------------------------------------------------------------- 2. file layout

    [Fact]
    public void WrittenFile_HasAlignedHeader_PtMetadata_AndContiguousOffsets()
    {
        var tensors = AllDTypes();
        SafeTensorsWriter.WriteAll(_dir, tensors);
        string path = Path.Combine(_dir, SafeTensorsWriter.SingleFileName);
        var (n, doc, fileLength) = ParseIndependently(path);
        using (doc)
        {
            Assert.Equal(0, n % 8);
            var root = doc.RootElement;
            Assert.Equal(JsonValueKind.Object, root.ValueKind);
            var meta = root.GetProperty("__metadata__");
            Assert.Equal(JsonValueKind.Object, meta.ValueKind);
            Assert.Equal("pt", meta.GetProperty("format").GetString());

            var sizes = new Dictionary<string, long> { ["F64"] = 8, ["F32"] = 4, ["F16"] = 2, ["BF16"] = 2, ["I64"] = 8, ["I32"] = 4, ["I16"] = 2, ["I8"] = 1, ["U8"] = 1, ["BOOL"] = 1 };
            var spans = new List<(long Begin, long End)>();
            foreach (var p in root.EnumerateObject().Where(p => p.Name != "__metadata__"))
            {
                var t = tensors.Single(x => x.Name == p.Name).Tensor;
                long[] shape = p.Value.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64()).ToArray();
                Assert.Equal(t.shape, shape);
                string dtype = p.Value.GetProperty("dtype").GetString()!;
                Assert.Equal(ExpectedDType[p.Name].ToString(), dtype);
                var off = p.Value.GetProperty("data_offsets").EnumerateArray().Select(d => d.GetInt64()).ToArray();
                Assert.Equal(2, off.Length);
                Assert.Equal(shape.Aggregate(1L, (a, b) => a * b) * sizes[dtype], off[1] - off[0]);
                spans.Add((off[0], off[1]));
            }
            Assert.Equal(tensors.Count, spans.Count);
            long cursor = 0;
            foreach (var (begin, end) in spans.OrderBy(s => s.Begin).ThenBy(s => s.End))
            {
                Assert.Equal(cursor, begin);
                cursor = end;
            }
            Assert.Equal(fileLength - 8 - n, cursor);   // no trailing bytes either
        }
    }

    [Fact]
    public void WrittenFile_HeaderIsPaddedTo8Bytes_ForEveryNameLength()
    {
        // Names of 1..8 characters give JSON headers of 8 different lengths mod 8.
        for (int k = 1; k <= 8; k++)
        {
            string dir = Path.Combine(_dir, $"pad{k}");
            SafeTensorsWriter.WriteAll(dir, new[] { (new string('n', k), torch.ones(3)) });
            string path = Path.Combine(dir, SafeTensorsWriter.SingleFileName);
            var (n, doc, fileLength) = ParseIndependently(path);
            doc.Dispose();
            Assert.True(n % 8 == 0, $"name length {k}: header length {n}");
            Assert.Equal(8 + n + 12, fileLength);
            using var f = SafeTensorsFile.Open(path);
            Assert.Equal(new float[] { 1, 1, 1 }, f.Read(new string('n', k)).data<float>().ToArray());
        }
    }

    [Fact]
    public void WrittenFile_TensorBytesAreLittleEndianAtTheirOffsets()
    {
        var t = torch.tensor(new int[] { 1, 0x01020304, -2 }, new long[] { 3 });
        SafeTensorsWriter.WriteAll(_dir, new[] { ("x", t) });
        string path = Path.Combine(_dir, SafeTensorsWriter.SingleFileName);
        byte[] all = File.ReadAllBytes(path);
        var (n, doc, _) = ParseIndependently(path);
        using (doc)
        {
            long begin = doc.RootElement.GetProperty("x").GetProperty("data_offsets")[0].GetInt64();
            var data = all.AsSpan((int)(8 + n + begin), 12);
            Assert.Equal(1, BinaryPrimitives.ReadInt32LittleEndian(data));
            Assert.Equal(0x01020304, BinaryPrimitives.ReadInt32LittleEndian(data[4..]));
            Assert.Equal(-2, BinaryPrimitives.ReadInt32LittleEndian(data[8..]));
        }
    }

    // ---------------------------------------------------------------- 3. sharding

    static List<(string Name, Tensor Tensor)> ShardTensors() => new()
    {
        ("a.weight", torch.randn(new long[] { 4, 4 }, ScalarType.Float32, generator: new torch.Generator(1))),   // 64 bytes
        ("a.bias", torch.randn(new long[] { 4 }, ScalarType.Float32, generator: new torch.Generator(2))),        // 16 bytes
        ("b.weight", torch.randn(new long[] { 8, 8 }, ScalarType.Float32, generator: new torch.Generator(3)).to(ScalarType.BFloat16)),   // 128 bytes > shard size
        ("b.mask", torch.tensor(new bool[] { true, false, true }, new long[] { 3 })),
        ("c.ids", torch.tensor(new long[] { 5, 6, 7, 8, 9, 10 }, new long[] { 2, 3 })),                        // 48 bytes
        ("c.empty", torch.zeros(new long[] { 0 }, ScalarType.Float16)),
    };

    [Fact]
    public void Sharding_WritesShardsAndIndex_ReaderReadsEverything()
    {
        var tensors = ShardTensors();
        var written = SafeTensorsWriter.WriteAll(_dir, tensors, shardBytes: 80);

        var shards = written.Where(w => w != SafeTensorsWriter.IndexFileName).ToList();
        Assert.Contains(SafeTensorsWriter.IndexFileName, written);
        Assert.True(shards.Count >= 3, $"expected several shards, got {shards.Count}");
        for (int k = 0; k < shards.Count; k++)
            Assert.Equal($"model-{k + 1:D5}-of-{shards.Count:D5}.safetensors", shards[k]);
        var onDisk = Directory.GetFiles(_dir).Select(Path.GetFileName).OrderBy(n => n, StringComparer.Ordinal).ToList();
        Assert.Equal(written.OrderBy(n => n, StringComparer.Ordinal), onDisk);
        Assert.DoesNotContain(SafeTensorsWriter.SingleFileName, onDisk);

        // Every shard respects the bound unless it holds a single tensor bigger than it.
        foreach (var s in shards)
        {
            using var f = SafeTensorsFile.Open(Path.Combine(_dir, s));
            long bytes = f.Tensors.Values.Sum(e => e.ByteLength);
            Assert.True(bytes <= 80 || f.Tensors.Count == 1, $"{s}: {bytes} bytes in {f.Tensors.Count} tensors");
        }

        // The index, parsed independently.
        var index = JsonNode.Parse(File.ReadAllText(Path.Combine(_dir, SafeTensorsWriter.IndexFileName)))!.AsObject();
        var weightMap = index["weight_map"]!.AsObject();
        Assert.Equal(tensors.Select(t => t.Name).OrderBy(n => n, StringComparer.Ordinal), weightMap.Select(kv => kv.Key).OrderBy(n => n, StringComparer.Ordinal));
        foreach (var kv in weightMap)
        {
            string file = kv.Value!.GetValue<string>();
            Assert.Contains(file, shards);
            using var f = SafeTensorsFile.Open(Path.Combine(_dir, file));
            Assert.True(f.Tensors.ContainsKey(kv.Key), $"{kv.Key} is not in {file}");
        }
        Assert.Equal(tensors.Sum(t => t.Tensor.numel() * SafeDTypes.Size(SafeDTypes.FromTorch(t.Tensor.dtype))), index["metadata"]!["total_size"]!.GetValue<long>());

        using var r = new CheckpointReader(_dir);
        Assert.Equal(shards.Count, r.WeightFiles.Count());
        Assert.Equal(tensors.Select(t => t.Name).OrderBy(n => n, StringComparer.Ordinal), r.Names.OrderBy(n => n, StringComparer.Ordinal));
        foreach (var (name, t) in tensors)
        {
            Assert.Equal(t.shape, r.Entry(name).Shape);
            using var back = r.Read(name, t.dtype, CPU);
            AssertBitEqual(t, back, name);
        }
    }

    [Fact]
    public void Sharding_LargeShardBytes_WritesOneFileWithoutIndex()
    {
        var written = SafeTensorsWriter.WriteAll(_dir, ShardTensors(), shardBytes: 1 << 20);
        Assert.Equal(new[] { SafeTensorsWriter.SingleFileName }, written);
        Assert.False(File.Exists(Path.Combine(_dir, SafeTensorsWriter.IndexFileName)));
    }

    // ---------------------------------------------------------------- 4. header validation

    [Fact]
    public void Rejects_FileShorterThan8Bytes()
    {
        string path = Path.Combine(_dir, "short.safetensors");
        File.WriteAllBytes(path, new byte[] { 1, 2, 3 });
        Rejects(path, "3 bytes");
        File.WriteAllBytes(path, Array.Empty<byte>());
        Rejects(path);
    }

    [Fact]
    public void Rejects_MissingFile()
    {
        Rejects(Path.Combine(_dir, "nope.safetensors"), "not found");
    }

    [Fact]
    public void Rejects_HugeHeaderLength_FastAndWithoutAllocating()
    {
        string path = Path.Combine(_dir, "huge.safetensors");
        var bytes = new byte[64];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, 1UL << 40);
        File.WriteAllBytes(path, bytes);
        long before = GC.GetAllocatedBytesForCurrentThread();
        var sw = System.Diagnostics.Stopwatch.StartNew();
        Rejects(path, (1UL << 40).ToString());
        Assert.True(GC.GetAllocatedBytesForCurrentThread() - before < 1 << 20, "Open allocated more than 1 MiB for a rejected header length");
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(5));

        // Just past the limit, and the largest u64 (which is negative as a long).
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)SafeTensorsFile.MaxHeaderBytes + 1);
        File.WriteAllBytes(path, bytes);
        Rejects(path, "limit");
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, ulong.MaxValue);
        File.WriteAllBytes(path, bytes);
        Rejects(path);
    }

    [Fact]
    public void Rejects_HeaderLengthPastEndOfFile()
    {
        string path = Path.Combine(_dir, "trunc.safetensors");
        var bytes = new byte[8 + 10];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, 100);
        File.WriteAllBytes(path, bytes);
        Rejects(path, "100", "end of the file");
        // Within the size limit but still past the end.
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)SafeTensorsFile.MaxHeaderBytes);
        File.WriteAllBytes(path, bytes);
        Rejects(path, "end of the file");
    }

    [Fact]
    public void Rejects_InvalidJson()
    {
        Rejects(Raw("{\"a\": "), "JSON");
        Rejects(Raw("not json at all"), "JSON");
        Rejects(Raw("{\"a\":1,}"), "JSON");
        Rejects(Raw(""), "JSON");
    }

    /// <summary>A header with <paramref name="bad"/> spliced in place of the "??" marker.</summary>
    string HeaderWithBytes(string header, byte[] bad, int dataBytes)
    {
        var bytes = Encoding.UTF8.GetBytes(header).ToList();
        int q = bytes.IndexOf((byte)'?');
        Assert.Equal((byte)'?', bytes[q + 1]);
        bytes.RemoveRange(q, 2);
        bytes.InsertRange(q, bad);
        return RawBytes(bytes.ToArray(), new byte[dataBytes]);
    }

    [Fact]
    public void Rejects_InvalidUtf8_OutsideStrings()
    {
        // A stray non-ASCII byte where a JSON token belongs.
        Rejects(HeaderWithBytes("{\"x\":??}", new byte[] { 0xFF }, 0), "JSON");
    }

    [Fact]
    public void Rejects_InvalidUtf8_InsideStrings()
    {
        string entry = Entry("F32", "[1]", "[0,4]");
        // 0xFF in a tensor name.
        Rejects(HeaderWithBytes("{\"a??b\":" + entry + "}", new byte[] { 0xFF }, 4));
        // A truncated two-byte sequence in a __metadata__ value.
        Rejects(HeaderWithBytes("{\"__metadata__\":{\"format\":\"p??\"},\"x\":" + entry + "}", new byte[] { 0xC3 }, 4));
        // An overlong encoding of '/' in a tensor name.
        Rejects(HeaderWithBytes("{\"x??\":" + entry + "}", new byte[] { 0xC0, 0xAF }, 4));
        // A lone surrogate (U+D800 encoded as UTF-8) in the dtype string.
        Rejects(HeaderWithBytes("{\"x\":{\"dtype\":\"F32??\",\"shape\":[1],\"data_offsets\":[0,4]}}", new byte[] { 0xED, 0xA0, 0x80 }, 4));
        // In a string the reader never converts (an extra field of a tensor entry): the header as a whole is not UTF-8.
        Rejects(HeaderWithBytes("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"note\":\"??\"}}", new byte[] { 0xFE }, 4));
    }

    [Fact]
    public void Rejects_NonObjectRoot()
    {
        Rejects(Raw("[]"), "not a JSON object");
        Rejects(Raw("\"x\""), "not a JSON object");
        Rejects(Raw("42"), "not a JSON object");
    }

    [Fact]
    public void Rejects_UnknownDType()
    {
        Rejects(Raw("{\"w\":" + Entry("F128", "[1]", "[0,16]") + "}", 16), "'w'", "F128");
        Rejects(Raw("{\"w\":" + Entry("f32", "[1]", "[0,4]") + "}", 4), "'w'", "f32");
        Rejects(Raw("{\"w\":{\"dtype\":3,\"shape\":[1],\"data_offsets\":[0,4]}}", 4), "'w'", "dtype");
    }

    [Fact]
    public void Rejects_Float8_AsNotSupported()
    {
        Rejects(Raw("{\"w8\":" + Entry("F8_E4M3", "[4]", "[0,4]") + "}", 4), "'w8'", "F8_E4M3", "not supported");
        Rejects(Raw("{\"w8\":" + Entry("F8_E5M2", "[4]", "[0,4]") + "}", 4), "'w8'", "F8_E5M2", "not supported");
    }

    [Fact]
    public void Rejects_BadShape()
    {
        Rejects(Raw("{\"neg\":" + Entry("F32", "[-1, 2]", "[0,0]") + "}"), "'neg'", "negative");
        Rejects(Raw("{\"frac\":" + Entry("F32", "[1.5]", "[0,4]") + "}", 4), "'frac'");
        Rejects(Raw("{\"str\":" + Entry("F32", "[\"2\"]", "[0,8]") + "}", 8), "'str'");
        Rejects(Raw("{\"noshape\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4), "'noshape'", "shape");
        // Element count overflowing 64 bits must not wrap around to a plausible size.
        Rejects(Raw("{\"big\":" + Entry("U8", "[4294967296, 4294967296, 4]", "[0,0]") + "}"), "'big'");
        Rejects(Raw("{\"big2\":" + Entry("F64", "[2305843009213693952]", "[0,0]") + "}"), "'big2'");
    }

    [Fact]
    public void Rejects_DataOffsetsNotAPair()
    {
        Rejects(Raw("{\"w\":" + Entry("F32", "[1]", "[0]") + "}", 4), "'w'", "data_offsets");
        Rejects(Raw("{\"w\":" + Entry("F32", "[1]", "[0,4,8]") + "}", 4), "'w'", "data_offsets");
        Rejects(Raw("{\"w\":" + Entry("F32", "[1]", "{\"a\":0}") + "}", 4), "'w'", "data_offsets");
        Rejects(Raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4), "'w'", "data_offsets");
        Rejects(Raw("{\"w\":" + Entry("F32", "[1]", "[-4,0]") + "}", 4), "'w'", "data_offsets");
        Rejects(Raw("{\"w\":" + Entry("F32", "[1]", "[0,\"4\"]") + "}", 4), "'w'", "data_offsets");
        Rejects(Raw("{\"w\":" + Entry("F32", "[1]", "[0,4.0e0]") + "}", 4), "'w'");
    }

    [Fact]
    public void Rejects_EndBeforeBegin()
    {
        Rejects(Raw("{\"w\":" + Entry("F32", "[0]", "[8,4]") + "}", 8), "'w'", "before begin");
    }

    [Fact]
    public void Rejects_ByteSizeNotMatchingShape()
    {
        Rejects(Raw("{\"w\":" + Entry("F32", "[2,2]", "[0,12]") + "}", 12), "'w'", "12", "16");
        Rejects(Raw("{\"h\":" + Entry("BF16", "[3]", "[0,3]") + "}", 3), "'h'");
        Rejects(Raw("{\"s\":" + Entry("F32", "[]", "[0,0]") + "}"), "'s'");   // rank 0 holds one element
    }

    [Fact]
    public void Rejects_GapBetweenTensors()
    {
        string h = "{\"first\":" + Entry("F32", "[1]", "[0,4]") + ",\"second\":" + Entry("F32", "[1]", "[8,12]") + "}";
        Rejects(Raw(h, 12), "'second'", "gap");
    }

    [Fact]
    public void Rejects_OverlappingTensors()
    {
        string h = "{\"first\":" + Entry("F32", "[2]", "[0,8]") + ",\"second\":" + Entry("F32", "[2]", "[4,12]") + "}";
        Rejects(Raw(h, 12), "'second'", "overlaps");
        // The same range twice.
        string same = "{\"p\":" + Entry("F32", "[1]", "[0,4]") + ",\"q\":" + Entry("F32", "[1]", "[0,4]") + "}";
        Rejects(Raw(same, 4), "overlaps");
    }

    [Fact]
    public void Rejects_FirstTensorNotAtZero()
    {
        Rejects(Raw("{\"late\":" + Entry("F32", "[1]", "[4,8]") + "}", 8), "'late'");
    }

    [Fact]
    public void Rejects_TrailingBytesAfterLastTensor()
    {
        Rejects(Raw("{\"w\":" + Entry("F32", "[1]", "[0,4]") + "}", 8), "4", "8");
        // And a header claiming more data than the file has.
        Rejects(Raw("{\"w\":" + Entry("F32", "[4]", "[0,16]") + "}", 8), "16", "8");
    }

    [Fact]
    public void Accepts_HandCraftedValidFile_WithPaddingAndZeroSizeTensors()
    {
        // Header padded with spaces, tensors listed out of offset order, a 0-byte tensor in the middle.
        string h = "{\"b\":" + Entry("I16", "[2]", "[4,8]") + ",\"z\":" + Entry("F32", "[0,5]", "[4,4]") + ",\"a\":" + Entry("U8", "[2,2]", "[0,4]")
            + ",\"__metadata__\":{\"k\":\"v\"}}";
        h = h.PadRight((h.Length + 7) / 8 * 8);
        string path = RawBytes(Encoding.UTF8.GetBytes(h), new byte[] { 1, 2, 3, 4, 0xFF, 0x7F, 0x01, 0x80 });
        using var f = SafeTensorsFile.Open(path);
        Assert.Equal("v", f.Metadata["k"]);
        Assert.Equal(new byte[] { 1, 2, 3, 4 }, f.Read("a").data<byte>().ToArray());
        Assert.Equal(new short[] { 0x7FFF, unchecked((short)0x8001) }, f.Read("b").data<short>().ToArray());
        Assert.Equal(new long[] { 0, 5 }, f.Read("z").shape);
    }

    [Fact]
    public void Accepts_EmptyHeaderObject_WithNoData()
    {
        using var f = SafeTensorsFile.Open(Raw("{}"));
        Assert.Empty(f.Tensors);
    }

    [Fact]
    public void Rejects_DuplicateTensorNames()
    {
        string h = "{\"dup\":" + Entry("F32", "[1]", "[0,4]") + ",\"dup\":" + Entry("F32", "[1]", "[4,8]") + "}";
        Rejects(Raw(h, 8), "'dup'", "duplicate");
    }

    [Fact]
    public void Rejects_DuplicateMetadata()
    {
        Rejects(Raw("{\"__metadata__\":{\"a\":\"1\"},\"__metadata__\":{\"b\":\"2\"}}"), "__metadata__");
        Rejects(Raw("{\"__metadata__\":{\"a\":\"1\",\"a\":\"2\"}}"), "'a'");
    }

    [Fact]
    public void Rejects_DeeplyNestedJson_WithoutStackOverflow()
    {
        string deep = new string('[', 10_000) + new string(']', 10_000);
        Rejects(Raw("{\"__metadata__\":" + deep + "}"));
        Rejects(Raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"extra\":" + deep + "}}", 4));
        Rejects(Raw(new string('{', 5_000) + new string('}', 5_000)));
        // Unbalanced too: must be a clean error, not a crash.
        Rejects(Raw("{\"__metadata__\":" + new string('[', 100_000)));
    }

    [Fact]
    public void Rejects_NonStringMetadataValue()
    {
        Rejects(Raw("{\"__metadata__\":{\"format\":1}}"), "__metadata__", "'format'");
        Rejects(Raw("{\"__metadata__\":{\"nested\":{\"a\":\"b\"}}}"), "__metadata__", "'nested'");
        Rejects(Raw("{\"__metadata__\":{\"n\":null}}"), "__metadata__", "'n'");
        Rejects(Raw("{\"__metadata__\":[\"format\",\"pt\"]}"), "__metadata__");
    }

    [Fact]
    public void Rejects_NonObjectTensorEntry()
    {
        Rejects(Raw("{\"w\":[\"F32\",[1],[0,4]]}", 4), "'w'");
        Rejects(Raw("{\"w\":null}"), "'w'");
    }

    // ---------------------------------------------------------------- 5. sharded index errors

    (string Dir, List<string> Shards) WriteSharded()
    {
        string dir = Path.Combine(_dir, "sharded");
        var written = SafeTensorsWriter.WriteAll(dir, ShardTensors(), shardBytes: 80);
        var shards = written.Where(w => w != SafeTensorsWriter.IndexFileName).ToList();
        Assert.True(shards.Count >= 3);
        return (dir, shards);
    }

    static JsonObject ReadIndex(string dir) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, SafeTensorsWriter.IndexFileName)))!.AsObject();

    static void WriteIndex(string dir, JsonObject index) =>
        File.WriteAllText(Path.Combine(dir, SafeTensorsWriter.IndexFileName), index.ToJsonString());

    static LlmSnpException ReaderRejects(string dir, params string[] mentions)
    {
        var e = Assert.Throws<LlmSnpException>(() => { using var r = new CheckpointReader(dir); });
        foreach (var m in mentions) Assert.Contains(m, e.Message);
        Assert.DoesNotContain('\n', e.Message);
        return e;
    }

    [Fact]
    public void Index_ListingAMissingFile_IsRejected()
    {
        var (dir, shards) = WriteSharded();
        File.Delete(Path.Combine(dir, shards[1]));
        ReaderRejects(dir, shards[1]);
    }

    [Fact]
    public void Index_NamingATensorAbsentFromItsShard_IsRejected()
    {
        var (dir, shards) = WriteSharded();
        var index = ReadIndex(dir);
        index["weight_map"]!["ghost.weight"] = shards[0];
        WriteIndex(dir, index);
        ReaderRejects(dir, shards[0], "'ghost.weight'");

        // An existing tensor mapped to the wrong shard.
        index = ReadIndex(dir);
        index["weight_map"]!.AsObject().Remove("ghost.weight");
        string victim = index["weight_map"]!.AsObject().First(kv => kv.Value!.GetValue<string>() == shards[0]).Key;
        index["weight_map"]![victim] = shards[^1];
        WriteIndex(dir, index);
        ReaderRejects(dir, shards[^1], $"'{victim}'");
    }

    [Theory]
    [InlineData("../x.safetensors")]
    [InlineData("sub/model-00001-of-00004.safetensors")]
    [InlineData("/etc/passwd")]
    [InlineData("..\\x.safetensors")]
    [InlineData("..")]
    public void Index_WithPathInWeightMap_IsRejected(string file)
    {
        var (dir, shards) = WriteSharded();
        var index = ReadIndex(dir);
        index["weight_map"]!["a.weight"] = file;
        WriteIndex(dir, index);
        ReaderRejects(dir, Path.Combine(dir, SafeTensorsWriter.IndexFileName), file, "'a.weight'");
    }

    [Fact]
    public void Index_Malformed_IsRejectedNamingTheIndex()
    {
        var (dir, _) = WriteSharded();
        string indexPath = Path.Combine(dir, SafeTensorsWriter.IndexFileName);
        File.WriteAllText(indexPath, "{\"weight_map\": ");
        ReaderRejects(dir, indexPath, "JSON");
        File.WriteAllText(indexPath, "{\"metadata\": {}}");
        ReaderRejects(dir, indexPath, "weight_map");
        File.WriteAllText(indexPath, "{\"weight_map\": {\"a.weight\": 3}}");
        ReaderRejects(dir, indexPath, "'a.weight'");
    }

    [Fact]
    public void Reader_EmptyDirectory_IsRejectedNamingTheDirectory()
    {
        string dir = Path.Combine(_dir, "empty");
        Directory.CreateDirectory(dir);
        ReaderRejects(dir, dir, SafeTensorsWriter.SingleFileName);
    }

    [Fact]
    public void Reader_MissingTensor_IsRejectedByName()
    {
        SafeTensorsWriter.WriteAll(_dir, new[] { ("x", torch.zeros(2)) });
        using var r = new CheckpointReader(_dir);
        var e = Assert.Throws<LlmSnpException>(() => r.Read("nope", ScalarType.Float32, CPU));
        Assert.Contains("'nope'", e.Message);
        Assert.Throws<LlmSnpException>(() => r.Entry("nope"));
    }

    // ---------------------------------------------------------------- 6. writer atomicity

    static void AssertNoTemporaries(string dir)
    {
        var leftovers = Directory.GetFileSystemEntries(dir, "*", SearchOption.AllDirectories)
            .Select(Path.GetFileName).Where(n => n!.Contains(".tmp") || n.Contains(".spill")).ToList();
        Assert.True(leftovers.Count == 0, "temporary files left: " + string.Join(", ", leftovers));
    }

    [Fact]
    public void Writer_LeavesNoTemporaryFiles_SingleFile()
    {
        using (var w = new SafeTensorsWriter(_dir))
        {
            foreach (var (n, t) in AllDTypes()) w.Add(n, t);
            w.Finish();
        }
        AssertNoTemporaries(_dir);
        Assert.Equal(new[] { SafeTensorsWriter.SingleFileName }, Directory.GetFileSystemEntries(_dir).Select(Path.GetFileName));
    }

    [Fact]
    public void Writer_LeavesNoTemporaryFiles_Sharded()
    {
        var (dir, shards) = WriteSharded();
        AssertNoTemporaries(dir);
        Assert.Equal(shards.Count + 1, Directory.GetFileSystemEntries(dir).Length);
    }

    [Fact]
    public void Writer_FinishOverwritesAnExistingCheckpointCompletely()
    {
        SafeTensorsWriter.WriteAll(_dir, new[] { ("old", torch.ones(100)) });
        SafeTensorsWriter.WriteAll(_dir, new[] { ("new", torch.zeros(3)) });
        AssertNoTemporaries(_dir);
        using var f = SafeTensorsFile.Open(Path.Combine(_dir, SafeTensorsWriter.SingleFileName));
        Assert.Equal(new[] { "new" }, f.Tensors.Keys);
    }

    [Fact]
    public void Writer_DisposedWithoutFinish_LeavesNoFiles()
    {
        using (var w = new SafeTensorsWriter(_dir))
            w.Add("x", torch.ones(10));
        Assert.Empty(Directory.GetFileSystemEntries(_dir));
    }
}
