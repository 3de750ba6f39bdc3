using System.Runtime.CompilerServices;
using System.Security.Cryptography;
using System.Text.Json;
using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

/// <summary>
/// The weights of an HF checkpoint directory: one `model.safetensors` or the shards named by
/// `model.safetensors.index.json`. Tensors are read lazily by name, each in its stored dtype.
/// </summary>
public sealed class CheckpointReader : IDisposable
{
    public string Directory { get; }
    readonly Dictionary<string, SafeTensorsFile> _files = new(StringComparer.Ordinal);
    readonly Dictionary<string, SafeTensorsFile> _byTensor = new(StringComparer.Ordinal);

    public IEnumerable<string> Names => _byTensor.Keys;
    public IEnumerable<string> WeightFiles => _files.Keys;
    /// <summary>Total bytes copied out of the weight files so far.</summary>
    public long BytesRead { get; private set; }

    public CheckpointReader(string directory)
    {
        Directory = directory;
        string single = Path.Combine(directory, SafeTensorsWriter.SingleFileName);
        string index = Path.Combine(directory, SafeTensorsWriter.IndexFileName);
        try
        {
            if (File.Exists(index)) OpenSharded(index);
            else if (File.Exists(single)) AddFile(single, null);
            else throw new LlmSnpException($"{directory}: no {SafeTensorsWriter.SingleFileName} or {SafeTensorsWriter.IndexFileName}");
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    void OpenSharded(string index)
    {
        Dictionary<string, string> weightMap = new(StringComparer.Ordinal);
        try
        {
            byte[] bytes = File.ReadAllBytes(index);
            if (!System.Text.Unicode.Utf8.IsValid(bytes)) throw new LlmSnpException($"{index}: not valid UTF-8");
            using var doc = JsonDocument.Parse(bytes, new JsonDocumentOptions { MaxDepth = 16 });
            if (doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty("weight_map", out var wm) || wm.ValueKind != JsonValueKind.Object)
                throw new LlmSnpException($"{index}: no weight_map object");
            foreach (var p in wm.EnumerateObject())
            {
                if (p.Value.ValueKind != JsonValueKind.String) throw new LlmSnpException($"{index}: weight_map entry '{p.Name}' is not a file name");
                string file = p.Value.GetString()!;
                if (file.Contains('/') || file.Contains('\\') || file.StartsWith('.'))
                    throw new LlmSnpException($"{index}: weight_map entry '{p.Name}' names '{file}', which is not a file in the checkpoint directory");
                if (!weightMap.TryAdd(p.Name, file)) throw new LlmSnpException($"{index}: duplicate weight_map entry '{p.Name}'");
            }
        }
        catch (JsonException e)
        {
            throw new LlmSnpException($"{index}: not valid JSON ({e.Message.Split('\n')[0]})");
        }
        foreach (var group in weightMap.GroupBy(kv => kv.Value))
        {
            var expected = group.Select(kv => kv.Key).ToHashSet(StringComparer.Ordinal);
            AddFile(Path.Combine(Directory, group.Key), expected);
        }
    }

    void AddFile(string path, HashSet<string>? expected)
    {
        var f = SafeTensorsFile.Open(path);
        _files[path] = f;
        foreach (var name in f.Tensors.Keys)
        {
            if (expected != null && !expected.Contains(name)) continue;   // the index decides which shard owns a name
            if (!_byTensor.TryAdd(name, f)) throw new LlmSnpException($"{path}: tensor '{name}' also appears in {_byTensor[name].Path}");
        }
        if (expected != null)
            foreach (var name in expected)
                if (!f.Tensors.ContainsKey(name)) throw new LlmSnpException($"{path}: tensor '{name}' listed in the index is missing");
    }

    public bool Has(string name) => _byTensor.ContainsKey(name);

    public TensorEntry Entry(string name) =>
        _byTensor.TryGetValue(name, out var f) ? f.Tensors[name] : throw new LlmSnpException($"{Directory}: missing tensor '{name}'");

    /// <summary>Reads a tensor and converts it to the given dtype and device.</summary>
    public Tensor Read(string name, ScalarType dtype, Device device)
    {
        if (!_byTensor.TryGetValue(name, out var f)) throw new LlmSnpException($"{Directory}: missing tensor '{name}'");
        var e = f.Tensors[name];
        BytesRead += e.ByteLength;
        if (device.type != DeviceType.CPU)
        {
            using var raw = f.Read(name);
            return raw.to(dtype, device);
        }
        var spare = TakeSpare(dtype, e.Shape);
        if (spare is null) return Issue(f.ReadConverted(name, dtype));
        try { f.ReadInto(name, spare); }
        catch { spare.Dispose(); throw; }
        return Issue(spare);
    }

    // Streaming a model block by block allocates the same weight shapes again for every block, and each
    // fresh allocation is memory the kernel maps and zeroes (~10 % of a llama3-8b evaluation's time):
    // a streamed block hands its weights back, and the next block's reads of equal dtype and shape
    // overwrite them. Only tensors this reader returned are taken back (never a view or a derived tensor
    // that something else may still hold), and at most one block's worth waits at a time.
    readonly ConditionalWeakTable<Tensor, object> _issued = new();
    readonly List<Tensor> _spare = new();

    Tensor Issue(Tensor t)
    {
        _issued.AddOrUpdate(t, this);
        return t;
    }

    Tensor? TakeSpare(ScalarType dtype, long[] shape)
    {
        lock (_spare)
        {
            int i = _spare.FindIndex(t => t.dtype == dtype && t.shape.SequenceEqual(shape));
            if (i < 0) return null;
            var t = _spare[i];
            _spare.RemoveAt(i);
            return t;
        }
    }

    /// <summary>
    /// Takes a streamed block's tensors for the next reads of the same dtype and shape (their values will be
    /// overwritten: the caller must hold no other reference to them); the ones this reader did not return are
    /// disposed, as is whatever the previous call left unclaimed. An empty call just releases that.
    /// </summary>
    public void Recycle(IEnumerable<Tensor> tensors)
    {
        lock (_spare)
        {
            ReleaseSpare();
            foreach (var t in tensors)
            {
                if (t.IsInvalid) continue;
                if (_issued.TryGetValue(t, out _) && t.is_contiguous()) { _issued.Remove(t); _spare.Add(t); }
                else t.Dispose();
            }
        }
    }

    void ReleaseSpare()
    {
        lock (_spare)
        {
            foreach (var t in _spare) t.Dispose();
            _spare.Clear();
        }
    }

    /// <summary>Reads a tensor after checking its stored shape against the one the config gives (one line naming both).</summary>
    public Tensor ReadShaped(string name, ScalarType dtype, Device device, long[] shape)
    {
        var e = Entry(name);
        if (!e.Shape.SequenceEqual(shape))
            throw new LlmSnpException($"{Directory}: tensor '{name}' has shape [{string.Join(", ", e.Shape)}], config says [{string.Join(", ", shape)}]");
        return Read(name, dtype, device);
    }

    /// <summary>The stored dtype shared by the floating-point tensors (the first one's, if mixed).</summary>
    public ScalarType StoredFloatDType =>
        _byTensor.Values.SelectMany(f => f.Tensors.Values).Select(e => SafeDTypes.ToTorch(e.DType)).FirstOrDefault(t => t.IsFloatingPoint(), ScalarType.Float32);

    /// <summary>SHA-256 of every weight file, for provenance.</summary>
    public Dictionary<string, string> Sha256()
    {
        var result = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var path in _files.Keys.OrderBy(p => p, StringComparer.Ordinal))
        {
            using var s = File.OpenRead(path);
            result[Path.GetFileName(path)] = Convert.ToHexStringLower(SHA256.HashData(s));
        }
        return result;
    }

    public void Dispose()
    {
        ReleaseSpare();
        foreach (var f in _files.Values) f.Dispose();
        _files.Clear();
    }
}

static class ScalarTypeExtensions
{
    public static bool IsFloatingPoint(this ScalarType t) =>
        t is ScalarType.Float64 or ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16;
}
