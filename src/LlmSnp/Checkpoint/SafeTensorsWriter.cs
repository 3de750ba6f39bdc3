using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

/// <summary>
/// Streams tensors into a checkpoint directory: tensor bytes go to a spill file as they arrive
/// (so a block's weights can be released right after it is added), and <see cref="Finish"/>
/// writes `model.safetensors`, or shards plus `model.safetensors.index.json` once the data passes
/// <c>shardBytes</c>. Every file is written to a temporary name and renamed when complete.
/// </summary>
public sealed class SafeTensorsWriter : IDisposable
{
    public const string SingleFileName = "model.safetensors";
    public const string IndexFileName = "model.safetensors.index.json";

    readonly string _dir;
    readonly long _shardBytes;
    readonly string _spillPath;
    readonly FileStream _spill;
    readonly List<(string Name, SafeDType DType, long[] Shape, long SpillOffset, long Length)> _entries = new();
    readonly HashSet<string> _names = new(StringComparer.Ordinal);
    bool _finished;

    public SafeTensorsWriter(string directory, long shardBytes = 2L << 30)
    {
        _dir = directory;
        _shardBytes = shardBytes;
        Directory.CreateDirectory(directory);
        _spillPath = System.IO.Path.Combine(directory, $".spill-{Guid.NewGuid():N}.tmp");
        _spill = new FileStream(_spillPath, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, 1 << 20);
    }

    public long TotalBytes => _spill.Length;

    /// <summary>Appends a tensor (any device; written contiguous, little-endian, in its own dtype).</summary>
    public void Add(string name, Tensor t)
    {
        if (_finished) throw new InvalidOperationException("writer already finished");
        if (!_names.Add(name)) throw new LlmSnpException($"duplicate tensor name '{name}' in output");
        using var c = t.detach().cpu().contiguous();
        var dtype = SafeDTypes.FromTorch(c.dtype);
        long len = c.numel() * SafeDTypes.Size(dtype);
        long offset = _spill.Length;
        _spill.Seek(0, SeekOrigin.End);
        // In pieces: a single span cannot cover a tensor of 2 GiB or more (TensorBytes).
        TensorBytes.Chunked(c, (_, bytes) => _spill.Write(bytes));
        _entries.Add((name, dtype, c.shape.ToArray(), offset, len));
    }

    /// <summary>Writes the final file(s); returns the file names written.</summary>
    public IReadOnlyList<string> Finish()
    {
        _finished = true;
        _spill.Flush();
        // Group tensors into shards in arrival order.
        var shards = new List<List<int>> { new() };
        long size = 0;
        for (int i = 0; i < _entries.Count; i++)
        {
            if (shards[^1].Count > 0 && size + _entries[i].Length > _shardBytes) { shards.Add(new()); size = 0; }
            shards[^1].Add(i);
            size += _entries[i].Length;
        }
        var names = shards.Count == 1
            ? new List<string> { SingleFileName }
            : Enumerable.Range(1, shards.Count).Select(k => $"model-{k:D5}-of-{shards.Count:D5}.safetensors").ToList();
        for (int s = 0; s < shards.Count; s++) WriteShard(names[s], shards[s]);
        if (shards.Count > 1)
        {
            var weightMap = new JsonObject();
            for (int s = 0; s < shards.Count; s++)
                foreach (int i in shards[s]) weightMap[_entries[i].Name] = names[s];
            var index = new JsonObject
            {
                ["metadata"] = new JsonObject { ["total_size"] = _entries.Sum(e => e.Length) },
                ["weight_map"] = weightMap,
            };
            AtomicFile.WriteAllText(System.IO.Path.Combine(_dir, IndexFileName), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            names.Add(IndexFileName);
        }
        return names;
    }

    void WriteShard(string fileName, List<int> members)
    {
        var header = new JsonObject { ["__metadata__"] = new JsonObject { ["format"] = "pt" } };
        long offset = 0;
        foreach (int i in members)
        {
            var e = _entries[i];
            header[e.Name] = new JsonObject
            {
                ["dtype"] = e.DType.ToString(),
                ["shape"] = new JsonArray(e.Shape.Select(d => (JsonNode)d).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + e.Length),
            };
            offset += e.Length;
        }
        byte[] json = Encoding.UTF8.GetBytes(header.ToJsonString());
        int padded = (json.Length + 7) / 8 * 8;   // the spec's 8-byte alignment of the data buffer
        var headerBytes = new byte[padded];
        Array.Fill(headerBytes, (byte)' ');
        json.CopyTo(headerBytes, 0);
        string final = System.IO.Path.Combine(_dir, fileName);
        AtomicFile.Write(final, fs =>
        {
            fs.Write(BitConverter.GetBytes((ulong)padded));
            fs.Write(headerBytes);
            var buffer = new byte[1 << 20];
            foreach (int i in members)
            {
                var e = _entries[i];
                _spill.Seek(e.SpillOffset, SeekOrigin.Begin);
                long left = e.Length;
                while (left > 0)
                {
                    int n = _spill.Read(buffer, 0, (int)Math.Min(buffer.Length, left));
                    if (n <= 0) throw new IOException("spill file ended early");
                    fs.Write(buffer, 0, n);
                    left -= n;
                }
            }
        });
    }

    public void Dispose()
    {
        _spill.Dispose();
        try { File.Delete(_spillPath); } catch (IOException) { }
    }

    /// <summary>Writes a whole set of tensors to a directory in one call.</summary>
    public static IReadOnlyList<string> WriteAll(string directory, IEnumerable<(string Name, Tensor Tensor)> tensors, long shardBytes = 2L << 30)
    {
        using var w = new SafeTensorsWriter(directory, shardBytes);
        foreach (var (n, t) in tensors) w.Add(n, t);
        return w.Finish();
    }
}

/// <summary>
/// Write-to-temporary-then-rename, so a reader never sees a half-written file: the temporary is the hidden sibling
/// <c>.NAME.tmp-PID-ID</c> (StagingDirectory), which a signal removes and which is renamed under the staging lock.
/// Only a regular file (or nothing) is ever replaced: renaming over a device, FIFO or symbolic link would replace it.
/// </summary>
public static class AtomicFile
{
    public static void Write(string path, Action<FileStream> write)
    {
        var existing = FileNodes.Kind(path);
        if (existing is not (FileNodeKind.Missing or FileNodeKind.Regular))
            throw new LlmSnpException($"{path}: is {FileNodes.Describe(existing)}, not a regular file; it is not replaced");
        string tmp = StagingDirectory.NewFile(path);
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                write(fs);
                fs.Flush(flushToDisk: true);
            }
            StagingDirectory.Publish(() => File.Move(tmp, path, overwrite: true));
        }
        catch (Exception e)
        {
            try { File.Delete(tmp); } catch (Exception d) when (d is IOException or UnauthorizedAccessException) { }
            if (ResourceLimits.IsFileTooLarge(e)) throw new LlmSnpException($"{path}: {ResourceLimits.FileSizeLine()}; nothing was written", e);
            throw;
        }
        finally { StagingDirectory.Release(tmp); }
    }

    public static void WriteAllText(string path, string text) =>
        Write(path, fs => fs.Write(Encoding.UTF8.GetBytes(text)));
}
