using System.Security.Cryptography;
using System.Text;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// Checkpoints as users have them on disk: behind symbolic links in a HuggingFace hub-cache
/// layout, and with tensors of 2 GiB or more. Each is compared with the same data read from a
/// plain directory or with bytes the test planted.
/// </summary>
[Collection("Console")]
public sealed class CheckpointLayoutTests : IDisposable
{
    readonly TempDir _tmp = new();
    public void Dispose() => _tmp.Dispose();

    static TinyOpt SmallOpt => new() { Vocab = 50272, Hidden = 32, Heads = 4, Ffn = 64, Layers = 2, MaxPositions = 64 };

    /// <summary>
    /// models--org--name/{blobs/SHA256, snapshots/REV/FILE → ../../blobs/SHA256, refs/main = REV}, as
    /// huggingface_hub writes it: every snapshot file, config and index included, is a relative link.
    /// </summary>
    static string HubCache(string plain, string cacheRoot)
    {
        string repo = Path.Combine(cacheRoot, "models--test--tiny-opt");
        string rev = "0123456789abcdef0123456789abcdef01234567";
        string blobs = Path.Combine(repo, "blobs"), snap = Path.Combine(repo, "snapshots", rev);
        Directory.CreateDirectory(blobs);
        Directory.CreateDirectory(snap);
        Directory.CreateDirectory(Path.Combine(repo, "refs"));
        File.WriteAllText(Path.Combine(repo, "refs", "main"), rev);
        foreach (var f in Directory.GetFiles(plain))
        {
            string hash = Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(f)));
            File.Copy(f, Path.Combine(blobs, hash), overwrite: true);
            File.CreateSymbolicLink(Path.Combine(snap, Path.GetFileName(f)), Path.Combine("..", "..", "blobs", hash));
        }
        return snap;
    }

    static void AssertSameTensors(string expectedDir, string actualDir)
    {
        using var a = new CheckpointReader(expectedDir);
        using var b = new CheckpointReader(actualDir);
        Assert.Equal(a.Names.Order(StringComparer.Ordinal), b.Names.Order(StringComparer.Ordinal));
        foreach (var n in a.Names)
        {
            var dt = SafeDTypes.ToTorch(a.Entry(n).DType);
            using var x = a.Read(n, dt, CPU);
            using var y = b.Read(n, dt, CPU);
            Assert.True(x.eq(y).all().item<bool>(), $"{n} differs when read through the hub-cache links");
        }
    }

    [Fact]
    public void Hub_cache_symlinks_load_stream_and_map_like_regular_files_single_and_sharded()
    {
        string single = SmallOpt.Write(_tmp.Sub("single"));
        // The same weights in three shards (a small shard size), with model.safetensors.index.json.
        string sharded = _tmp.Sub("sharded");
        Directory.CreateDirectory(sharded);
        using (var r = new CheckpointReader(single))
        {
            var tensors = r.Names.Select(n => (n, r.Read(n, ScalarType.Float32, CPU))).ToList();
            var files = SafeTensorsWriter.WriteAll(sharded, tensors, shardBytes: 3_000_000);
            Assert.Contains(SafeTensorsWriter.IndexFileName, files);
            foreach (var (_, t) in tensors) t.Dispose();
        }
        File.Copy(Path.Combine(single, "config.json"), Path.Combine(sharded, "config.json"));

        foreach (var plain in new[] { single, sharded })
        {
            string snap = HubCache(plain, _tmp.Sub("hub-" + Path.GetFileName(plain)));
            foreach (var f in Directory.GetFiles(snap)) Assert.NotNull(new FileInfo(f).LinkTarget);   // really links
            AssertSameTensors(plain, snap);
            // Each weight file opened directly (mapped through the link) sees the target's full length.
            foreach (var f in Directory.GetFiles(snap, "*.safetensors"))
            {
                using var st = SafeTensorsFile.Open(f);
                Assert.Equal(new FileInfo(Path.Combine(plain, Path.GetFileName(f))).Length, 8 + HeaderLength(f) + st.Tensors.Values.Sum(e => e.ByteLength));
            }
        }

        // Through the CLI: inspect and eval ppl give the same answers as for the plain directory.
        string snapSingle = Path.Combine(_tmp.Sub("hub-single"), "models--test--tiny-opt", "snapshots", "0123456789abcdef0123456789abcdef01234567");
        var evalArgs = new[] { "--dataset", "wikitext2", "--seqlen", "32", "--max-windows", "3" };
        var plainPpl = JsonNode.Parse(CliHarness.Succeeds(CliHarness.Run(new[] { "eval", "ppl", "--model", single }.Concat(evalArgs).ToArray())))!;
        var linkPpl = JsonNode.Parse(CliHarness.Succeeds(CliHarness.Run(new[] { "eval", "ppl", "--model", snapSingle }.Concat(evalArgs).ToArray())))!;
        Assert.Equal(plainPpl["perplexity"]!.GetValue<double>(), linkPpl["perplexity"]!.GetValue<double>());
        var plainInfo = JsonNode.Parse(CliHarness.Succeeds(CliHarness.Run(new[] { "inspect", "--model", single })))!;
        var linkInfo = JsonNode.Parse(CliHarness.Succeeds(CliHarness.Run(new[] { "inspect", "--model", snapSingle })))!;
        Assert.Equal(plainInfo["parameters"]!.ToJsonString(), linkInfo["parameters"]!.ToJsonString());

        // A link whose blob is gone is named as such, not as a short or missing file.
        string broken = _tmp.Sub("broken");
        Directory.CreateDirectory(broken);
        File.CreateSymbolicLink(Path.Combine(broken, "model.safetensors"), "../../blobs/gone");
        var e = Assert.Throws<LlmSnpException>(() => SafeTensorsFile.Open(Path.Combine(broken, "model.safetensors")));
        Assert.Contains("broken symbolic link", e.Message);
        // A directory where the weights should be is named as a directory.
        Directory.CreateDirectory(Path.Combine(_tmp.Sub("dir-as-file"), "model.safetensors"));
        e = Assert.Throws<LlmSnpException>(() => SafeTensorsFile.Open(Path.Combine(_tmp.Sub("dir-as-file"), "model.safetensors")));
        Assert.Contains("is a directory", e.Message);
    }

    static long HeaderLength(string f)
    {
        using var fs = File.OpenRead(f);
        var b = new byte[8];
        fs.ReadExactly(b);
        return (long)BitConverter.ToUInt64(b);
    }

    /// <summary>A safetensors header for the given (name, dtype, shape, bytes) list, 8-byte aligned.</summary>
    static byte[] Header(params (string Name, string DType, long[] Shape, long Bytes)[] tensors)
    {
        var h = new JsonObject();
        long off = 0;
        foreach (var (n, d, s, b) in tensors)
        {
            h[n] = new JsonObject { ["dtype"] = d, ["shape"] = new JsonArray(s.Select(x => (JsonNode)x).ToArray()), ["data_offsets"] = new JsonArray(off, off + b) };
            off += b;
        }
        var json = Encoding.UTF8.GetBytes(h.ToJsonString());
        var padded = new byte[(json.Length + 7) / 8 * 8];
        Array.Fill(padded, (byte)' ');
        json.CopyTo(padded, 0);
        return BitConverter.GetBytes((ulong)padded.Length).Concat(padded).ToArray();
    }

    [Fact]
    public void Tensors_past_2_GiB_are_located_read_and_written_exactly()
    {
        // 1. Offsets past 2 GiB, without the memory: a sparse file holding a 128256 × 8192 F32
        //    embedding (4.2 GB, never read) followed by a small tensor whose bytes are planted.
        long embBytes = 128256L * 8192 * 4;
        string sparse = _tmp.Sub("sparse.safetensors");
        var header = Header(("model.embed_tokens.weight", "F32", new long[] { 128256, 8192 }, embBytes), ("tail", "F32", new long[] { 4 }, 16));
        float[] tail = { 1.5f, -2.25f, 3e-5f, 65504f };
        using (var fs = new FileStream(sparse, FileMode.CreateNew))
        {
            fs.Write(header);
            fs.SetLength(header.Length + embBytes + 16);   // a hole: no disk blocks, zeros when read
            fs.Seek(header.Length + embBytes, SeekOrigin.Begin);
            foreach (var x in tail) fs.Write(BitConverter.GetBytes(x));
        }
        using (var f = SafeTensorsFile.Open(sparse))
        {
            var emb = f.Tensors["model.embed_tokens.weight"];
            Assert.Equal(embBytes, emb.ByteLength);
            Assert.True(emb.ByteLength > int.MaxValue);
            Assert.Equal(embBytes, f.Tensors["tail"].Begin);
            using var t = f.Read("tail");
            Assert.Equal(tail, t.data<float>().ToArray());
        }

        // 2. The chunked copy itself, at a tiny chunk size: every byte lands at its own offset.
        using (var src = torch.arange(1000, ScalarType.Int32))
        {
            var seen = new byte[4000];
            long covered = 0;
            TensorBytes.Chunked(src, (off, span) => { span.CopyTo(seen.AsSpan((int)off)); covered += span.Length; }, maxChunkBytes: 12);
            Assert.Equal(4000, covered);
            Assert.Equal(src.data<int>().ToArray(), Enumerable.Range(0, 1000).Select(i => BitConverter.ToInt32(seen, i * 4)).ToArray());
        }

        // 3. A real tensor just over 2 GiB (2^31 + 24 bytes, ~4.3 GB of memory at the peak), written
        //    and read back: bytes planted on both sides of the 2 GiB boundary and at the end must survive.
        long n = (1L << 31) + 24;
        string dir = _tmp.Sub("big");
        var marks = new (long Index, byte Value)[] { (0, 11), ((1L << 31) - 1, 22), (1L << 31, 33), (n - 1, 44), (123_456_789, 55) };
        using (var big = torch.zeros(n, ScalarType.Byte))
        {
            foreach (var (i, v) in marks) big[i] = torch.tensor(v, ScalarType.Byte);
            SafeTensorsWriter.WriteAll(dir, new[] { ("big", big) }, shardBytes: 4L << 30);
        }
        string file = Path.Combine(dir, SafeTensorsWriter.SingleFileName);
        Assert.Equal(HeaderLength(file) + 8 + n, new FileInfo(file).Length);
        using (var f = SafeTensorsFile.Open(file))
        using (var back = f.Read("big"))
        {
            Assert.Equal(new[] { n }, back.shape);
            foreach (var (i, v) in marks) Assert.Equal(v, back[i].item<byte>());
            Assert.Equal(marks.Length, back.count_nonzero().item<long>());   // and nothing else became non-zero
        }
    }
}
