using System.IO.Compression;
using System.Text;
using LlmSnp.Checkpoint;
using static TorchSharp.torch;

namespace LlmSnp.Benchmarks;

/// <summary>
/// Writes a checkpoint's tensors as `pytorch_model.bin` in torch.save's zip layout (`ARCHIVE/data.pkl`, a protocol-2
/// pickle of an OrderedDict of `_rebuild_tensor_v2` calls, and one stored entry `ARCHIVE/data/KEY` per tensor), for the
/// streaming benchmark and the tests; the library only reads the format. One tensor is read and written at a time,
/// so a multi-GB file needs no more memory than its largest tensor. (Checked once against PyTorch 1.13's `torch.load`:
/// same names, dtypes and values.)
/// </summary>
public static class PytorchBinWriter
{
    static readonly Dictionary<ScalarType, string> StorageNames = new()
    {
        [ScalarType.Float64] = "DoubleStorage", [ScalarType.Float32] = "FloatStorage", [ScalarType.Float16] = "HalfStorage",
        [ScalarType.BFloat16] = "BFloat16Storage", [ScalarType.Int64] = "LongStorage", [ScalarType.Int32] = "IntStorage",
        [ScalarType.Int8] = "CharStorage", [ScalarType.Byte] = "ByteStorage", [ScalarType.Bool] = "BoolStorage",
    };

    /// <summary>Rewrites the safetensors checkpoint in <paramref name="source"/> as `pytorch_model.bin` (plus its config and tokenizer files) in <paramref name="dest"/>.</summary>
    public static void Convert(string source, string dest)
    {
        Directory.CreateDirectory(dest);
        using (var reader = new CheckpointReader(source))
        {
            var names = reader.Names.OrderBy(n => n, StringComparer.Ordinal).ToList();
            Write(Path.Combine(dest, PytorchBinFile.SingleFileName), names.Select(n => (n, SafeDTypes.ToTorch(reader.Entry(n).DType), reader.Entry(n).Shape)),
                n => reader.Read(n, SafeDTypes.ToTorch(reader.Entry(n).DType), CPU));
        }
        foreach (var f in Directory.GetFiles(source))
            if (!f.EndsWith(".safetensors") && !f.EndsWith(SafeTensorsWriter.IndexFileName)) File.Copy(f, Path.Combine(dest, Path.GetFileName(f)), overwrite: true);
    }

    /// <param name="read">Gives each tensor when it is written (disposed after).</param>
    public static void Write(string path, IEnumerable<(string Name, ScalarType DType, long[] Shape)> tensors, Func<string, Tensor> read)
    {
        var list = tensors.ToList();
        string archive = "pytorch_model";
        using var fs = new FileStream(path, FileMode.Create, FileAccess.ReadWrite, FileShare.None, 1 << 20);
        using var zip = new ZipArchive(fs, ZipArchiveMode.Create);
        using (var pkl = zip.CreateEntry(archive + "/data.pkl", CompressionLevel.NoCompression).Open()) pkl.Write(Pickle(list));
        for (int i = 0; i < list.Count; i++)
        {
            using var t = read(list[i].Name);
            using var c = t.contiguous();
            using var o = zip.CreateEntry($"{archive}/data/{i}", CompressionLevel.NoCompression).Open();
            TensorBytes.Chunked(c, (_, bytes) => o.Write(bytes));
        }
        using (var v = zip.CreateEntry(archive + "/version", CompressionLevel.NoCompression).Open()) v.Write("3\n"u8);
    }

    /// <summary>The state-dict pickle: OrderedDict name → _rebuild_tensor_v2(storage i, 0, shape, contiguous strides, False, OrderedDict()).</summary>
    static byte[] Pickle(List<(string Name, ScalarType DType, long[] Shape)> tensors)
    {
        var p = new MemoryStream();
        void B(params byte[] b) => p.Write(b);
        void Str(string s) { var u = Encoding.UTF8.GetBytes(s); B((byte)'X'); p.Write(BitConverter.GetBytes(u.Length)); p.Write(u); }
        void Global(string module, string name) { B((byte)'c'); p.Write(Encoding.ASCII.GetBytes(module + "\n" + name + "\n")); }
        void Int(long v)
        {
            if (v >= 0 && v < 256) B((byte)'K', (byte)v);
            else if (v >= 0 && v < 65536) { B((byte)'M'); p.Write(BitConverter.GetBytes((ushort)v)); }
            else if (v >= int.MinValue && v <= int.MaxValue) { B((byte)'J'); p.Write(BitConverter.GetBytes((int)v)); }
            else { B(0x8a, 8); p.Write(BitConverter.GetBytes(v)); }
        }
        void Tuple(IEnumerable<long> xs) { B((byte)'('); foreach (var x in xs) Int(x); B((byte)'t'); }
        B(0x80, 2);
        Global("collections", "OrderedDict");
        B((byte)')', (byte)'R', (byte)'(');
        for (int i = 0; i < tensors.Count; i++)
        {
            var (name, dtype, shape) = tensors[i];
            long numel = shape.Aggregate(1L, (a, b) => a * b);
            var stride = new long[shape.Length];
            for (long d = shape.Length - 1, s = 1; d >= 0; s *= shape[d], d--) stride[d] = s;
            Str(name);
            Global("torch._utils", "_rebuild_tensor_v2");
            B((byte)'(', (byte)'(');
            Str("storage");
            Global("torch", StorageNames[dtype]);
            Str(i.ToString());
            Str("cpu");
            Int(numel);
            B((byte)'t', (byte)'Q');
            Int(0);
            Tuple(shape);
            Tuple(stride);
            B(0x89);
            Global("collections", "OrderedDict");
            B((byte)')', (byte)'R', (byte)'t', (byte)'R');
        }
        B((byte)'u', (byte)'.');
        return p.ToArray();
    }
}
