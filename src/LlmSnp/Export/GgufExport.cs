using System.Diagnostics;
using System.Text.Json;
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
/// Writes a LLaMA-family checkpoint (llama, mistral, qwen2 in HF layout, dense or pruned by LlmSnp)
/// as a GGUF file that llama.cpp loads: architecture <c>llama</c> when every layer has the same
/// widths, <c>deci</c> (whose loader reads per-layer head and FFN counts) when they differ.
/// Everything llama.cpp would not compute the way the checkpoint does is refused before a byte
/// is written; the file appears only when complete.
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

    /// <summary>What config.json says the checkpoint holds, checked against what llama.cpp can express.</summary>
    sealed record Plan(
        string ModelType, int Hidden, int Vocab, int Layers, int HeadDim, double Eps, double Theta, int MaxPositions, bool Tied,
        int[] Ffn, int[] Heads, int[] KvHeads, bool QkvBias, bool OBias, bool MlpBias)
    {
        public bool Uniform => Ffn.All(f => f == Ffn[0]) && Heads.All(h => h == Heads[0]) && KvHeads.All(k => k == KvHeads[0]);
        public string Architecture => Uniform ? "llama" : "deci";
    }

    public static GgufExportResult Run(string modelDir, string outFile, GgufDType dtype)
    {
        var sw = Stopwatch.StartNew();
        var cfg = ConfigFile.Load(modelDir);
        var plan = ReadPlan(cfg);
        string? outDir = Path.GetDirectoryName(Path.GetFullPath(outFile));
        if (outDir == null || !Directory.Exists(outDir)) throw new LlmSnpException($"{outFile}: output directory does not exist");
        var vocab = ReadVocabulary(modelDir, cfg, plan);

        using var ckpt = new CheckpointReader(modelDir);
        var consumed = new HashSet<string>(StringComparer.Ordinal);
        // llama.cpp's llama and deci loaders read attn_q.bias at n_embd entries, whatever the layer's head count.
        // Zero q/k/v biases (what a pruned Llama carries beside a reconstructed o_proj bias, for the stock
        // attention_bias flag) compute nothing and are left out; any other q bias in a narrowed layer is refused.
        var narrowed = Enumerable.Range(0, plan.Layers).Where(i => plan.Heads[i] * plan.HeadDim != plan.Hidden).ToArray();
        if (plan.QkvBias && narrowed.Length > 0)
        {
            var qkv = Enumerable.Range(0, plan.Layers).SelectMany(i => new[] { "q_proj", "k_proj", "v_proj" }.Select(n => $"model.layers.{i}.self_attn.{n}.bias")).ToArray();
            if (qkv.All(n => ckpt.Has(n) && IsZero(ckpt, n)))
            {
                plan = plan with { QkvBias = false };
                consumed.UnionWith(qkv);
            }
            else
            {
                int i = narrowed[0];
                throw new LlmSnpException($"{cfg.Path}: layer {i}: q_proj.bias has {plan.Heads[i]} heads × {plan.HeadDim} = {plan.Heads[i] * plan.HeadDim} entries; llama.cpp's llama/deci loaders read attn_q.bias as hidden_size = {plan.Hidden} entries, so a q bias needs all heads kept");
            }
        }
        var writer = new GgufWriter();
        string arch = plan.Architecture;
        WriteMetadata(writer, plan, vocab, dtype, Path.GetFileName(Path.GetFullPath(modelDir).TrimEnd('/')));

        var biases = new SortedSet<string>(StringComparer.Ordinal);
        int H = plan.Hidden, D = plan.HeadDim;

        void Add(string hf, string gguf, long[] shape, string why, int ropeHeads = 0)
        {
            var e = ckpt.Has(hf) ? ckpt.Entry(hf) : throw new LlmSnpException($"{modelDir}: missing tensor '{hf}' (expected shape [{string.Join(", ", shape)}] from {why})");
            if (!e.Shape.SequenceEqual(shape))
                throw new LlmSnpException($"{modelDir}: tensor '{hf}' has shape [{string.Join(", ", e.Shape)}], expected [{string.Join(", ", shape)}] from config.json {why}");
            if (!SafeDTypes.ToTorch(e.DType).IsFloatingPoint()) throw new LlmSnpException($"{modelDir}: tensor '{hf}' is {e.DType}, not a floating-point weight");
            consumed.Add(hf);
            // Norms and biases stay F32: they are tiny, and ggml's element-wise ops expect F32 there.
            var type = shape.Length == 2 && dtype == GgufDType.F16 ? GgmlType.F16 : GgmlType.F32;
            writer.AddTensor(gguf, shape, type, s => WriteTensor(s, ckpt, hf, type, ropeHeads));
        }

        Add("model.embed_tokens.weight", "token_embd.weight", [plan.Vocab, H], "vocab_size × hidden_size");
        for (int i = 0; i < plan.Layers; i++)
        {
            string p = $"model.layers.{i}.";
            int q = plan.Heads[i] * D, kv = plan.KvHeads[i] * D, f = plan.Ffn[i];
            string heads = $"layer {i}: {plan.Heads[i]} heads × head_dim {D}", kvs = $"layer {i}: {plan.KvHeads[i]} kv heads × head_dim {D}", ffn = $"layer {i}: intermediate size {f}";
            Add(p + "input_layernorm.weight", $"blk.{i}.attn_norm.weight", [H], "hidden_size");
            // llama.cpp's llama/deci graphs rotate interleaved pairs; HF rotates halves: q/k rows go back per head.
            Add(p + "self_attn.q_proj.weight", $"blk.{i}.attn_q.weight", [q, H], heads, plan.Heads[i]);
            Add(p + "self_attn.k_proj.weight", $"blk.{i}.attn_k.weight", [kv, H], kvs, plan.KvHeads[i]);
            Add(p + "self_attn.v_proj.weight", $"blk.{i}.attn_v.weight", [kv, H], kvs);
            Add(p + "self_attn.o_proj.weight", $"blk.{i}.attn_output.weight", [H, q], heads);
            if (plan.QkvBias)
            {
                Add(p + "self_attn.q_proj.bias", $"blk.{i}.attn_q.bias", [q], heads, plan.Heads[i]);
                Add(p + "self_attn.k_proj.bias", $"blk.{i}.attn_k.bias", [kv], kvs, plan.KvHeads[i]);
                Add(p + "self_attn.v_proj.bias", $"blk.{i}.attn_v.bias", [kv], kvs);
            }
            if (plan.OBias) Add(p + "self_attn.o_proj.bias", $"blk.{i}.attn_output.bias", [H], "hidden_size");
            Add(p + "post_attention_layernorm.weight", $"blk.{i}.ffn_norm.weight", [H], "hidden_size");
            Add(p + "mlp.gate_proj.weight", $"blk.{i}.ffn_gate.weight", [f, H], ffn);
            Add(p + "mlp.up_proj.weight", $"blk.{i}.ffn_up.weight", [f, H], ffn);
            Add(p + "mlp.down_proj.weight", $"blk.{i}.ffn_down.weight", [H, f], ffn);
            if (plan.MlpBias)
            {
                Add(p + "mlp.gate_proj.bias", $"blk.{i}.ffn_gate.bias", [f], ffn);
                Add(p + "mlp.up_proj.bias", $"blk.{i}.ffn_up.bias", [f], ffn);
                Add(p + "mlp.down_proj.bias", $"blk.{i}.ffn_down.bias", [H], "hidden_size");
            }
        }
        Add("model.norm.weight", "output_norm.weight", [H], "hidden_size");
        if (!plan.Tied) Add("lm_head.weight", "output.weight", [plan.Vocab, H], "vocab_size × hidden_size (tie_word_embeddings false)");
        // A tied checkpoint may still store lm_head; transformers replaces it with the embedding, and so does llama.cpp.
        else if (ckpt.Has("lm_head.weight")) consumed.Add("lm_head.weight");

        foreach (var name in ckpt.Names.OrderBy(n => n, StringComparer.Ordinal))
        {
            if (consumed.Contains(name)) continue;
            if (name.EndsWith(".self_attn.rotary_emb.inv_freq", StringComparison.Ordinal)) continue;   // a recomputed buffer older exports saved
            if (name.EndsWith(".bias", StringComparison.Ordinal))
                throw new LlmSnpException($"{modelDir}: tensor '{name}' is a bias config.json does not declare (attention_bias / mlp_bias)");
            throw new LlmSnpException($"{modelDir}: tensor '{name}' has no place in a {plan.ModelType} GGUF (llama.cpp would not compute it)");
        }
        if (plan.QkvBias) biases.UnionWith(["q_proj", "k_proj", "v_proj"]);
        if (plan.OBias) biases.Add("o_proj");
        if (plan.MlpBias) biases.UnionWith(["gate_proj", "up_proj", "down_proj"]);

        long bytes = 0;
        AtomicFile.Write(outFile, fs => bytes = writer.Write(fs));
        var layers = Enumerable.Range(0, plan.Layers).Select(i => new GgufLayerWidths(i, plan.Heads[i], plan.KvHeads[i], plan.Ffn[i])).ToList();
        return new GgufExportResult(Path.GetFullPath(outFile), arch, dtype.ToString(), writer.TensorCount, bytes, plan.Vocab, H, D,
            plan.Tied, biases.ToList(), layers, sw.Elapsed.TotalSeconds);
    }

    static bool IsZero(CheckpointReader ckpt, string name)
    {
        using var t = ckpt.Read(name, TorchSharp.torch.ScalarType.Float32, TorchSharp.torch.CPU);
        return t.count_nonzero().item<long>() == 0;
    }

    static Plan ReadPlan(ConfigFile cfg)
    {
        string type = cfg.ModelType;
        if (type is not ("llama" or "mistral" or "qwen2"))
            throw cfg.Unsupported("model_type", $"is '{type}'; GGUF export supports llama, mistral and qwen2");
        if (cfg.Has("hidden_act") && cfg.String("hidden_act") != "silu")
            throw cfg.Unsupported("hidden_act", $"is '{cfg.String("hidden_act")}'; llama.cpp's llama/deci graphs use SiLU (SwiGLU)");
        if (cfg.Has("rope_scaling"))
            throw cfg.Unsupported("rope_scaling", "is set; only plain RoPE (rope_scaling null) is exported");
        int layers = cfg.Layers();
        if (layers > MaxLayers) throw cfg.Unsupported("num_hidden_layers", $"is {layers}; llama.cpp holds at most {MaxLayers} layers");
        int hidden = cfg.Int("hidden_size");
        int vocab = cfg.Int("vocab_size");
        int maxPos = cfg.Int("max_position_embeddings");
        bool pruned = cfg.Bool("pruned", false);
        int heads0 = cfg.Int("num_attention_heads");
        int kv0 = cfg.Int("num_key_value_heads", heads0);
        int ffn0 = cfg.Int("intermediate_size");
        int headDim;
        if (cfg.Has("head_dim")) headDim = cfg.Int("head_dim");
        else if (pruned) throw cfg.Missing("head_dim", "an integer (a pruned checkpoint's head size cannot be derived from hidden_size / num_attention_heads)");
        else if (hidden % heads0 != 0) throw cfg.Unsupported("hidden_size", $"{hidden} is not a multiple of num_attention_heads {heads0} and no head_dim is given");
        else headDim = hidden / heads0;
        if (headDim % 2 != 0) throw cfg.Unsupported("head_dim", $"is {headDim}; RoPE needs an even head size");

        if (type == "mistral" && cfg.Has("sliding_window") && cfg.Int("sliding_window") < maxPos)
            throw cfg.Unsupported("sliding_window", $"is {cfg.Int("sliding_window")} < max_position_embeddings {maxPos}; llama.cpp's llama architecture has no sliding-window attention");
        if (type == "qwen2" && cfg.Bool("use_sliding_window", false))
            throw cfg.Unsupported("use_sliding_window", "is true; llama.cpp's llama architecture has no sliding-window attention");

        int[] ffn = Widths(cfg, "intermediate_sizes", "intermediate_size", ffn0, layers, "FFN neurons");
        int[] heads = Widths(cfg, "num_heads_per_layer", "num_attention_heads", heads0, layers, "attention heads");
        int[] kv = Widths(cfg, "num_key_value_heads_per_layer", "num_key_value_heads", kv0, layers, "key/value heads");
        for (int i = 0; i < layers; i++)
            if (heads[i] % kv[i] != 0)
                throw cfg.Unsupported("num_heads_per_layer", $"[{i}] = {heads[i]} is not a multiple of num_key_value_heads_per_layer[{i}] = {kv[i]} (grouped-query attention needs whole groups)");

        bool qkvBias = type == "qwen2" || cfg.Bool("attention_bias", false);   // Qwen2 always has q/k/v biases
        bool oBias = cfg.Bool("attention_bias", false);
        bool mlpBias = cfg.Bool("mlp_bias", false);

        double eps = cfg.Double("rms_norm_eps", 1e-6);
        double theta = cfg.Double("rope_theta", 10000.0);
        if (!(eps > 0) || !double.IsFinite(eps)) throw cfg.Unsupported("rms_norm_eps", $"is {eps}; must be a positive number");
        if (!(theta > 0) || !double.IsFinite(theta)) throw cfg.Unsupported("rope_theta", $"is {theta}; must be a positive number");
        return new Plan(type, hidden, vocab, layers, headDim, eps, theta, maxPos, cfg.Bool("tie_word_embeddings", false),
            ffn, heads, kv, qkvBias, oBias, mlpBias);
    }

    /// <summary>
    /// A per-layer width: the list field when present (a pruned checkpoint), else the stock field for
    /// every layer. When the list is uniform, the stock field must hold the same value (LlmSnp's format).
    /// A 0 is refused with its own reason: GGUF tensors cannot have a 0 dimension, and llama.cpp's deci
    /// graph treats n_ff = 0 / n_head = 0 as layers of other models (it skips the rest of an FFN-free
    /// layer, attention output included).
    /// </summary>
    static int[] Widths(ConfigFile cfg, string listField, string stockField, int stock, int layers, string what)
    {
        var node = cfg.Json[listField];
        if (node == null) return Enumerable.Repeat(stock, layers).ToArray();
        if (node is not JsonArray a || a.Count != layers) throw new LlmSnpException($"{cfg.Path}: field '{listField}' must be a list of {layers} integers");
        var r = new int[layers];
        for (int i = 0; i < layers; i++)
        {
            if (a[i] is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out int x) && x >= 0) r[i] = x;
            else throw new LlmSnpException($"{cfg.Path}: field '{listField}'[{i}] is not a non-negative integer");
            if (x == 0) throw new LlmSnpException($"{cfg.Path}: field '{listField}'[{i}] is 0: layer {i} has no {what}; a GGUF tensor cannot have a 0 dimension and llama.cpp's deci graph gives such layers another meaning");
        }
        if (r.All(x => x == r[0]) && r[0] != stock)
            throw cfg.Unsupported(stockField, $"is {stock} but every entry of '{listField}' is {r[0]} (a uniformly pruned checkpoint stores the pruned value in both)");
        return r;
    }

    sealed record Vocabulary(List<string> Tokens, List<float> Scores, List<int> Types, int Bos, int Eos, int Unk, int Pad, bool AddBos, bool AddEos, bool AddSpacePrefix);

    static Vocabulary ReadVocabulary(string modelDir, ConfigFile cfg, Plan plan)
    {
        string path = Path.Combine(modelDir, "tokenizer.model");
        if (!File.Exists(path))
            throw new LlmSnpException($"{path}: file not found; GGUF export needs the SentencePiece tokenizer.model (a tokenizer.json-only checkpoint, e.g. Qwen2's byte-level BPE, is not supported)");
        string added = Path.Combine(modelDir, "added_tokens.json");
        if (File.Exists(added)) throw new LlmSnpException($"{added}: added tokens beyond tokenizer.model are not exported");
        var spm = SentencePieceModel.Load(path);
        int n = spm.Pieces.Count;
        if (n > plan.Vocab) throw new LlmSnpException($"{path}: {n} pieces, more than config.json vocab_size {plan.Vocab}");

        bool addBos = true, addEos = false;
        string tcPath = Path.Combine(modelDir, "tokenizer_config.json");
        if (File.Exists(tcPath))
        {
            JsonObject tc;
            try
            {
                tc = JsonNode.Parse(File.ReadAllBytes(tcPath), documentOptions: new JsonDocumentOptions { MaxDepth = 32 }) as JsonObject
                    ?? throw new LlmSnpException($"{tcPath}: not a JSON object");
            }
            catch (JsonException e) { throw new LlmSnpException($"{tcPath}: not valid JSON ({e.Message.Split('\n')[0]})"); }
            addBos = JsonBool(tc, "add_bos_token", true, tcPath);
            addEos = JsonBool(tc, "add_eos_token", false, tcPath);
            if (tc["added_tokens_decoder"] is JsonObject dec)
                foreach (var kv in dec)
                    if (!int.TryParse(kv.Key, out int id) || id < 0 || id >= n)
                        throw new LlmSnpException($"{tcPath}: added token id '{kv.Key}' is not one of tokenizer.model's {n} pieces; added tokens are not exported");
        }

        int Special(string field, int fromProto)
        {
            int id = cfg.Has(field) ? cfg.Int(field, min: 0) : fromProto;
            if (id < 0 || id >= n) throw new LlmSnpException($"{cfg.Path}: {field} {id} is not a token of tokenizer.model ({n} pieces)");
            return id;
        }
        int bos = Special("bos_token_id", spm.BosId), eos = Special("eos_token_id", spm.EosId);
        if (spm.UnkId < 0 || spm.UnkId >= n) throw new LlmSnpException($"{path}: unk_id {spm.UnkId} is not one of its {n} pieces");
        int pad = cfg.Has("pad_token_id") ? Special("pad_token_id", -1) : (spm.PadId >= 0 && spm.PadId < n ? spm.PadId : -1);

        var tokens = spm.Pieces.Select(p => p.Piece).ToList();
        var scores = spm.Pieces.Select(p => p.Score).ToList();
        var types = spm.Pieces.Select(p => (int)p.Type).ToList();   // SentencePiece's type numbers are llama.cpp's token types
        // Embedding rows past the tokenizer (vocabulary padded for alignment): named as llama.cpp's converter names them.
        for (int i = n; i < plan.Vocab; i++) { tokens.Add($"[PAD{i}]"); scores.Add(-1000f); types.Add((int)SentencePieceModel.PieceType.Unused); }
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var t in tokens)
            if (!seen.Add(t)) throw new LlmSnpException($"{path}: piece '{t}' appears twice");
        return new Vocabulary(tokens, scores, types, bos, eos, spm.UnkId, pad, addBos, addEos, spm.AddDummyPrefix);
    }

    static bool JsonBool(JsonObject o, string field, bool fallback, string path)
    {
        var n = o[field];
        if (n == null) return fallback;
        if (n is JsonValue v && v.TryGetValue<JsonElement>(out var e) && e.ValueKind is JsonValueKind.True or JsonValueKind.False) return e.GetBoolean();
        throw new LlmSnpException($"{path}: field '{field}' is not true or false");
    }

    static void WriteMetadata(GgufWriter w, Plan plan, Vocabulary v, GgufDType dtype, string name)
    {
        string a = plan.Architecture;
        w.AddString("general.architecture", a);
        w.AddString("general.name", name);
        w.AddUInt32("general.file_type", dtype == GgufDType.F32 ? 0u : 1u);   // LLAMA_FTYPE_ALL_F32 / MOSTLY_F16
        w.AddUInt32($"{a}.vocab_size", (uint)plan.Vocab);
        w.AddUInt32($"{a}.context_length", (uint)plan.MaxPositions);
        w.AddUInt32($"{a}.embedding_length", (uint)plan.Hidden);
        w.AddUInt32($"{a}.block_count", (uint)plan.Layers);
        if (plan.Uniform)
        {
            w.AddUInt32($"{a}.feed_forward_length", (uint)plan.Ffn[0]);
            w.AddUInt32($"{a}.attention.head_count", (uint)plan.Heads[0]);
            w.AddUInt32($"{a}.attention.head_count_kv", (uint)plan.KvHeads[0]);
        }
        else
        {
            // deci's loader reads these three per layer (int32 arrays of block_count entries).
            w.AddInt32Array($"{a}.feed_forward_length", plan.Ffn);
            w.AddInt32Array($"{a}.attention.head_count", plan.Heads);
            w.AddInt32Array($"{a}.attention.head_count_kv", plan.KvHeads);
        }
        // Explicit: llama.cpp would otherwise take embedding_length / head_count, wrong once heads are pruned.
        w.AddUInt32($"{a}.attention.key_length", (uint)plan.HeadDim);
        w.AddUInt32($"{a}.attention.value_length", (uint)plan.HeadDim);
        w.AddUInt32($"{a}.rope.dimension_count", (uint)plan.HeadDim);
        w.AddFloat32($"{a}.rope.freq_base", (float)plan.Theta);
        w.AddFloat32($"{a}.attention.layer_norm_rms_epsilon", (float)plan.Eps);

        w.AddString("tokenizer.ggml.model", "llama");   // llama.cpp's SentencePiece (SPM) tokenizer
        w.AddStringArray("tokenizer.ggml.tokens", v.Tokens);
        w.AddFloat32Array("tokenizer.ggml.scores", v.Scores);
        w.AddInt32Array("tokenizer.ggml.token_type", v.Types);
        w.AddUInt32("tokenizer.ggml.bos_token_id", (uint)v.Bos);
        w.AddUInt32("tokenizer.ggml.eos_token_id", (uint)v.Eos);
        w.AddUInt32("tokenizer.ggml.unknown_token_id", (uint)v.Unk);
        if (v.Pad >= 0) w.AddUInt32("tokenizer.ggml.padding_token_id", (uint)v.Pad);
        w.AddBool("tokenizer.ggml.add_bos_token", v.AddBos);
        w.AddBool("tokenizer.ggml.add_eos_token", v.AddEos);
        w.AddBool("tokenizer.ggml.add_space_prefix", v.AddSpacePrefix);
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

    static void WriteTensor(Stream s, CheckpointReader ckpt, string name, GgmlType type, int ropeHeads)
    {
        using var scope = NewDisposeScope();
        // float32 holds every F16/BF16/F32 value exactly; the permutation moves rows only.
        var t = ckpt.Read(name, ScalarType.Float32, CPU);
        if (ropeHeads > 0) t = PermuteForRope(t, ropeHeads);
        t = FiniteCast.To(t, type == GgmlType.F16 ? ScalarType.Float16 : ScalarType.Float32, ckpt.Directory, name, "export it with --dtype f32");
        t = t.contiguous();
        s.Write(t.bytes);
    }
}
