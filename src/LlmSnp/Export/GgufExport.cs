using System.Diagnostics;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Export;

/// <summary>Output dtype of the 2-D weights; norms and biases are always F32 (as llama.cpp's converter writes them).</summary>
public enum GgufDType { F32, F16 }

public sealed record GgufLayerWidths(int Layer, int Heads, int KvHeads, int FfnDim);

public sealed record GgufExportResult(
    string Path, string Architecture, string DType, int TensorCount, long Bytes, int VocabSize, int HiddenSize,
    int HeadDim, bool TiedEmbeddings, IReadOnlyList<string> Biases, IReadOnlyList<GgufLayerWidths> Layers, double Seconds)
{
    public JsonObject ToJson() => new()
    {
        ["path"] = Path, ["architecture"] = Architecture, ["dtype"] = DType, ["tensors"] = TensorCount, ["bytes"] = Bytes,
        ["vocab_size"] = VocabSize, ["hidden_size"] = HiddenSize, ["head_dim"] = HeadDim, ["tied_embeddings"] = TiedEmbeddings,
        ["biases"] = new JsonArray(Biases.Select(b => (JsonNode)b).ToArray()),
        ["layers"] = new JsonArray(Layers.Select(l => (JsonNode)new JsonObject
        {
            ["layer"] = l.Layer, ["heads"] = l.Heads, ["kv_heads"] = l.KvHeads, ["ffn"] = l.FfnDim,
        }).ToArray()),
        ["seconds"] = Math.Round(Seconds, 3),
    };
}

/// <summary>
/// One stored tensor as a GGUF tensor: its checkpoint name, GGUF name, the shape config.json implies (and why), RoPE heads
/// to reorder (0: none), and a constant added to every value (Gemma's norms store w for a scale of 1 + w; llama.cpp
/// multiplies by the stored weight, so its converter writes 1 + w).
/// </summary>
public sealed record GgufTensor(string Source, string Name, long[] Shape, string Why, int RopeHeads = 0, float Offset = 0)
{
    /// <summary>
    /// A 3-D tensor stacked from these stored tensors along a new first axis (a mixture's experts, each [rows, cols]:
    /// llama.cpp's ffn_*_exps); <see cref="Source"/> is then the first of them. Null: the one stored tensor.
    /// </summary>
    public IReadOnlyList<string>? Stacked { get; init; }

    /// <summary>
    /// Values llama.cpp needs that the checkpoint does not store as a tensor but its config.json gives (longrope's
    /// rope_factors_long / rope_factors_short), written as F32; <see cref="Source"/> then names the config field.
    /// </summary>
    public float[]? Values { get; init; }
}

/// <summary>What a checkpoint being exported offers its family's exporter.</summary>
public sealed record GgufSource(string ModelDir, ConfigFile Config, CheckpointReader Checkpoint, GgufDType DType)
{
    /// <summary>Whether the head is the embedding: a tied head may be stored under either name, or twice (untied where they differ, as transformers loads it).</summary>
    public bool HeadTied(bool configTies) => Checkpoint.TieHead("model.embed_tokens.weight", "lm_head.weight", configTies);
}

/// <summary>
/// A family's GGUF file, as its exporter plans it: llama.cpp's architecture and hyper-parameters, the
/// tokenizer, and the tensors in file order. Everything llama.cpp would not compute the way the checkpoint
/// does is refused while planning, before a byte is written.
/// </summary>
public sealed record GgufPlan
{
    public required string Architecture { get; init; }
    public required int Vocab { get; init; }
    public required int Hidden { get; init; }
    public required int HeadDim { get; init; }
    public required bool Tied { get; init; }
    public required IReadOnlyList<GgufLayerWidths> Layers { get; init; }
    /// <summary>Which projections carry biases (for the result).</summary>
    public required IReadOnlyList<string> Biases { get; init; }
    /// <summary>Writes the architecture's hyper-parameters and the tokenizer (after general.*).</summary>
    public required Action<GgufWriter> Metadata { get; init; }
    public required IReadOnlyList<GgufTensor> Tensors { get; init; }
    /// <summary>Stored tensors deliberately left out (a tied lm_head, all-zero biases, recomputed buffers).</summary>
    public IReadOnlyCollection<string> Skipped { get; init; } = Array.Empty<string>();
    /// <summary>Why a stored tensor that is neither written nor skipped cannot be exported.</summary>
    public required Func<string, string> Unplaced { get; init; }
}

/// <summary>A family's GGUF export: how its checkpoints map onto one of llama.cpp's architectures.</summary>
public interface IGgufExporter
{
    GgufPlan Plan(GgufSource source);
}

/// <summary>
/// `llmsnp export gguf`: a checkpoint (dense or pruned by LlmSnp) as a GGUF file that llama.cpp loads, planned by
/// its family's exporter (the registry says which families have one). The file appears only when complete.
/// </summary>
public static class GgufExport
{
    /// <summary>llama.cpp's LLAMA_MAX_LAYERS: its per-layer hparams are fixed-size arrays.</summary>
    public const int MaxLayers = 512;

    public static GgufDType ParseDType(string s) => s.ToLowerInvariant() switch
    {
        "f32" or "float32" => GgufDType.F32,
        "f16" or "float16" => GgufDType.F16,
        "bf16" or "bfloat16" => throw new LlmSnpException("--dtype bf16: BF16 GGUF output is not written (llama.cpp's CPU builds may lack BF16 kernels); use f16 or f32"),
        _ => throw new LlmSnpException($"--dtype: unknown GGUF dtype '{s}' (f32, f16)"),
    };

    /// <summary>Whether the checkpoint's family exports GGUF (its model_type is read, nothing else).</summary>
    public static bool Supports(string modelDir) => ModelFamilies.Of(modelDir).Gguf is not null;

    public static GgufExportResult Run(string modelDir, string outFile, GgufDType dtype)
    {
        var sw = Stopwatch.StartNew();
        var cfg = ConfigFile.Load(modelDir);
        var family = ModelFamilies.ForType(cfg);
        var exporter = family.Gguf ?? throw cfg.Unsupported("model_type",
            $"is '{cfg.ModelType}'; GGUF export supports {string.Join(", ", ModelFamilies.All.Where(f => f.Gguf != null).SelectMany(f => f.ModelTypes))}");
        string? outDir = Path.GetDirectoryName(Path.GetFullPath(outFile));
        if (outDir == null || !Directory.Exists(outDir)) throw new LlmSnpException($"{outFile}: output directory does not exist");
        if (cfg.Layers() > MaxLayers) throw cfg.Unsupported("num_hidden_layers", $"is {cfg.Layers()}; llama.cpp holds at most {MaxLayers} layers");

        using var ckpt = new CheckpointReader(modelDir);
        var plan = exporter.Plan(new GgufSource(modelDir, cfg, ckpt, dtype));
        var writer = new GgufWriter();
        writer.AddString("general.architecture", plan.Architecture);
        writer.AddString("general.name", Path.GetFileName(Path.GetFullPath(modelDir).TrimEnd('/')));
        writer.AddUInt32("general.file_type", dtype == GgufDType.F32 ? 0u : 1u);   // LLAMA_FTYPE_ALL_F32 / MOSTLY_F16
        plan.Metadata(writer);

        var consumed = new HashSet<string>(plan.Skipped, StringComparer.Ordinal);
        foreach (var t in plan.Tensors)
        {
            if (t.Values is float[] values)
            {
                if (values.Length != t.Shape.Aggregate(1L, (x, y) => x * y)) throw new InvalidOperationException($"{t.Name}: {values.Length} values for shape [{string.Join(", ", t.Shape)}]");
                writer.AddTensor(t.Name, t.Shape, GgmlType.F32, s => s.Write(System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan())));
                continue;
            }
            var sources = t.Stacked ?? new[] { t.Source };
            var each = t.Stacked is null ? t.Shape : t.Shape.Skip(1).ToArray();
            foreach (var source in sources)
            {
                var e = ckpt.Has(source) ? ckpt.Entry(source) : throw new LlmSnpException($"{modelDir}: missing tensor '{source}' (expected shape [{string.Join(", ", each)}] from {t.Why})");
                if (!e.Shape.SequenceEqual(each))
                    throw new LlmSnpException($"{modelDir}: tensor '{source}' has shape [{string.Join(", ", e.Shape)}], expected [{string.Join(", ", each)}] from config.json {t.Why}");
                if (!SafeDTypes.ToTorch(e.DType).IsFloatingPoint()) throw new LlmSnpException($"{modelDir}: tensor '{source}' is {e.DType}, not a floating-point weight");
                consumed.Add(source);
            }
            // Norms and biases stay F32: they are tiny, and ggml's element-wise ops expect F32 there.
            var type = t.Shape.Length >= 2 && dtype == GgufDType.F16 ? GgmlType.F16 : GgmlType.F32;
            // Stacked: each part written in turn is the C-order stack along the first axis.
            writer.AddTensor(t.Name, t.Shape, type, s => { foreach (var source in sources) WriteTensor(s, ckpt, source, type, t.RopeHeads, t.Offset); });
        }
        foreach (var name in ckpt.Names.OrderBy(n => n, StringComparer.Ordinal))
            if (!consumed.Contains(name)) throw new LlmSnpException($"{modelDir}: tensor '{name}' {plan.Unplaced(name)}");

        long bytes = 0;
        AtomicFile.Write(outFile, fs => bytes = writer.Write(fs));
        return new GgufExportResult(Path.GetFullPath(outFile), plan.Architecture, dtype.ToString(), writer.TensorCount, bytes, plan.Vocab, plan.Hidden, plan.HeadDim,
            plan.Tied, plan.Biases, plan.Layers, sw.Elapsed.TotalSeconds);
    }

    /// <summary>Whether every value of a stored tensor is zero (a bias that computes nothing may be left out).</summary>
    public static bool IsZero(CheckpointReader ckpt, string name)
    {
        using var t = ckpt.Read(name, ScalarType.Float32, CPU);
        return t.count_nonzero().item<long>() == 0;
    }

    /// <summary>
    /// HF's rotate-half row order → llama.cpp's interleaved pairs, per head: within a head, HF row
    /// <c>half·d/2 + j</c> becomes row <c>2j + half</c>. Works on a weight [heads·d, in] or a bias [heads·d].
    /// </summary>
    public static Tensor PermuteForRope(Tensor w, int heads)
    {
        long rows = w.shape[0];
        if (rows % (2 * heads) != 0) throw new ArgumentException($"{rows} rows do not split into {heads} heads of even size");
        long half = rows / heads / 2;
        var rest = w.shape.Skip(1).ToArray();
        var shape = new long[] { heads, 2, half }.Concat(rest).ToArray();
        return w.reshape(shape).transpose(1, 2).reshape(w.shape);
    }

    static void WriteTensor(Stream s, CheckpointReader ckpt, string name, GgmlType type, int ropeHeads, float offset)
    {
        using var scope = NewDisposeScope();
        // float32 holds every F16/BF16/F32 value exactly; the permutation moves rows only.
        var t = ckpt.Read(name, ScalarType.Float32, CPU);
        if (ropeHeads > 0) t = PermuteForRope(t, ropeHeads);
        if (offset != 0) t = t + offset;
        t = FiniteCast.To(t, type == GgmlType.F16 ? ScalarType.Float16 : ScalarType.Float32, ckpt.Directory, name, "export it with --dtype f32");
        t = t.contiguous();
        s.Write(t.bytes);
    }
}
