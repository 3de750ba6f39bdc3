using System.Runtime.CompilerServices;
using System.Security.Cryptography;
using System.Text.Json;
using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

/// <summary>
/// The weights of an HF checkpoint directory: `model.safetensors`, the shards named by
/// `model.safetensors.index.json`, or the same in PyTorch's format (`pytorch_model.bin`, or the shards named by
/// `pytorch_model.bin.index.json`), as transformers looks for them. Tensors are read lazily by name, each in
/// its stored dtype. A quantized checkpoint is refused when it is opened (<see cref="Quantization"/>).
/// A name a file's `__metadata__` declares an alias of a stored tensor (how `safetensors.torch.save_model`
/// stores a tied weight once) reads that tensor; <see cref="TieHead"/> settles a tied head stored under either name.
/// </summary>
public sealed class CheckpointReader : IDisposable
{
    public string Directory { get; }
    /// <summary>"safetensors" or "pytorch" (pytorch_model.bin).</summary>
    public string Format { get; }
    readonly Dictionary<string, ITensorFile> _files = new(StringComparer.Ordinal);
    readonly Dictionary<string, ITensorFile> _byTensor = new(StringComparer.Ordinal);
    /// <summary>Names that read another stored tensor: a file's alias metadata, or a tied weight stored under its other name.</summary>
    readonly Dictionary<string, string> _aliases = new(StringComparer.Ordinal);

    /// <summary>The stored tensor names (aliases not included).</summary>
    public IEnumerable<string> Names => _byTensor.Keys;
    public IEnumerable<string> WeightFiles => _files.Keys;
    /// <summary>Total bytes copied out of the weight files so far.</summary>
    public long BytesRead { get; private set; }

    public CheckpointReader(string directory)
    {
        Directory = directory;
        Quantization.RefuseConfig(directory);
        string F(string name) => Path.Combine(directory, name);
        try
        {
            if (File.Exists(F(SafeTensorsWriter.IndexFileName))) { Format = "safetensors"; OpenSharded(F(SafeTensorsWriter.IndexFileName), SafeTensorsFile.Open); }
            else if (File.Exists(F(SafeTensorsWriter.SingleFileName))) { Format = "safetensors"; AddFile(SafeTensorsFile.Open(F(SafeTensorsWriter.SingleFileName)), null); }
            else if (File.Exists(F(PytorchBinFile.IndexFileName))) { Format = "pytorch"; OpenSharded(F(PytorchBinFile.IndexFileName), PytorchBinFile.Open); }
            else if (File.Exists(F(PytorchBinFile.SingleFileName))) { Format = "pytorch"; AddFile(PytorchBinFile.Open(F(PytorchBinFile.SingleFileName)), null); }
            else throw new LlmSnpException($"{directory}: no weights ({SafeTensorsWriter.SingleFileName}, {SafeTensorsWriter.IndexFileName}, {PytorchBinFile.SingleFileName} or {PytorchBinFile.IndexFileName})");
            Quantization.RefuseTensors(directory, _byTensor.Keys);
            foreach (var f in _files.Values)
                foreach (var (alias, target) in f.Metadata)
                    if (!_byTensor.ContainsKey(alias) && _byTensor.ContainsKey(target)) _aliases.TryAdd(alias, target);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    void OpenSharded(string index, Func<string, ITensorFile> open)
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
        // Every shard is checked to be there before any is opened: a download cut short says which file it lacks.
        foreach (var group in weightMap.GroupBy(kv => kv.Value))
        {
            string shard = Path.Combine(Directory, group.Key);
            if (!File.Exists(shard)) throw new LlmSnpException($"{index}: weight_map names shard '{group.Key}' (for '{group.First().Key}'), which is not in {Directory}");
        }
        foreach (var group in weightMap.GroupBy(kv => kv.Value))
        {
            var expected = group.Select(kv => kv.Key).ToHashSet(StringComparer.Ordinal);
            AddFile(open(Path.Combine(Directory, group.Key)), expected);
        }
    }

    void AddFile(ITensorFile f, HashSet<string>? expected)
    {
        string path = f.Path;
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

    /// <summary>The stored name a name reads (itself, or the tensor it is an alias of).</summary>
    string Stored(string name) => _byTensor.ContainsKey(name) ? name : _aliases.TryGetValue(name, out var t) ? t : name;

    /// <summary>
    /// Settles how a model's output head is stored, as transformers does, and returns whether it is tied to the
    /// token embedding. A tying config (tie_word_embeddings) with only the head stored (TinyStories-656K:
    /// `lm_head.weight` with the alias metadata, or without it) reads the embedding from the head; with only
    /// the embedding stored, the head is the embedding; with both stored and equal, tied; with both stored and
    /// different, untied (transformers keeps a checkpoint's distinct head rather than overwrite it).
    /// A config that does not tie needs both.
    /// </summary>
    public bool TieHead(string embedding, string head, bool configTies)
    {
        bool hasEmbedding = Has(embedding), hasHead = Has(head);
        if (!hasEmbedding && !hasHead) throw new LlmSnpException($"{Directory}: missing tensor '{embedding}' (and no tied '{head}' to read it from)");
        if (!configTies)
        {
            if (!hasHead) throw new LlmSnpException($"{Directory}: tie_word_embeddings is false but {head} is missing");
            if (!hasEmbedding) throw new LlmSnpException($"{Directory}: missing tensor '{embedding}' (tie_word_embeddings is false, so '{head}' cannot stand for it)");
            return false;
        }
        if (!hasHead) return true;
        if (!hasEmbedding)
        {
            _aliases[embedding] = Stored(head);
            return true;
        }
        return SameValues(embedding, head);
    }

    /// <summary>Whether two tensors hold the same values: one storage, or equal bytes.</summary>
    bool SameValues(string a, string b)
    {
        string sa = Stored(a), sb = Stored(b);
        if (sa == sb) return true;
        var (fa, fb) = (_byTensor[sa], _byTensor[sb]);
        if (ReferenceEquals(fa, fb) && fa.SameStorage(sa, sb)) return true;
        var (ea, eb) = (fa.Tensors[sa], fb.Tensors[sb]);
        if (ea.DType != eb.DType || !ea.Shape.SequenceEqual(eb.Shape)) return false;
        using var x = fa.Read(sa);
        using var y = fb.Read(sb);
        using var eq = x.eq(y);
        using var all = eq.all();
        return all.item<bool>();
    }

    public bool Has(string name) => _byTensor.ContainsKey(Stored(name));

    public TensorEntry Entry(string name) =>
        _byTensor.TryGetValue(Stored(name), out var f) ? f.Tensors[Stored(name)] : throw new LlmSnpException($"{Directory}: missing tensor '{name}'");

    /// <summary>Reads a tensor and converts it to the given dtype and device.</summary>
    public Tensor Read(string name, ScalarType dtype, Device device)
    {
        if (!_byTensor.TryGetValue(Stored(name), out var f)) throw new LlmSnpException($"{Directory}: missing tensor '{name}'");
        name = Stored(name);
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
