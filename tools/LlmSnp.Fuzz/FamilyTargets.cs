using TorchSharp;
using System.Text;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Data.Images;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Reliability;

/// <summary>
/// The targets beyond OPT: LLaMA-family and ViT/DeiT model directories (config edits, tensor edits, weight-file and
/// index mutations), tokenizer files (SentencePiece protobuf, tokenizer.json, vocab.json + merges.txt) and labels.tsv.
/// Each is opened the way the CLI opens it: <see cref="ModelFamilies.Open"/> + every block + a short forward,
/// <see cref="TextTokenizers.ForModel"/> + an encode, <see cref="ImageSet.Load"/>.
/// </summary>
public static partial class HeaderFuzzer
{
    // ------------------------------------------------------------------ opening

    static void OpenFamilyModel(string dir)
    {
        using var m = ModelFamilies.Open(dir);
        using var scope = NewDisposeScope();
        Tensor input = m switch
        {
            ILanguageModel lm => (torch.arange(Math.Max(1, Math.Min(4, lm.MaxPositions)), ScalarType.Int64) % Math.Max(1, lm.VocabSize)).unsqueeze(0),
            IImageClassifier ic => torch.rand(new long[] { 1, ic.Channels, ic.ImageSize, ic.ImageSize }, generator: new Generator(1)),
            _ => throw new InvalidOperationException($"{m.Family}: no forward input for this family"),
        };
        var h = m.Embed(input);
        for (int i = 0; i < m.BlockCount; i++)
        {
            using var b = m.LoadBlock(i);
            h = b.Forward(h)!;
        }
        var logits = m.Head(h);
        long want = m switch { ILanguageModel lm => lm.VocabSize, IImageClassifier ic => ic.Classes, _ => -1 };
        if (logits.shape[^1] != want) throw new SilentCorruptionException($"logits have {logits.shape[^1]} columns, the model has {want} outputs");
    }

    static void OpenTokenizer(string dir)
    {
        var tok = TextTokenizers.ForModel(dir);
        try
        {
            var ids = tok.Encode("Once upon a time, Lily saw a big dog. é\u00a0日本");
            if (ids.Any(i => i < 0)) throw new SilentCorruptionException("a negative token id");
            _ = tok.Decode(ids);
        }
        finally { (tok as IDisposable)?.Dispose(); }
    }

    [ThreadStatic] static long? _labelClasses;

    static void OpenLabels(string dir)
    {
        var set = ImageSet.Load(dir, _labelClasses);
        if (set.Images.Count == 0) throw new SilentCorruptionException("an image set with no images loaded");
        if (_labelClasses is long n && set.Images.Any(i => i.Label < 0 || i.Label >= n)) throw new SilentCorruptionException("a class index outside the model's classes loaded");
    }

    // ------------------------------------------------------------------ LLaMA family

    static readonly string[] LlamaMutations =
    {
        "llama-valid", "llama-mistral", "llama-qwen2", "llama-kv-heads", "llama-head-dim", "llama-rope-scaling", "llama-rope-theta",
        "llama-sliding-window", "llama-biases", "llama-tied", "llama-per-layer-lists", "llama-hidden-act", "llama-config-edit",
        "llama-missing-tensor", "llama-transposed", "llama-extra-tensor", "llama-half-dtype", "llama-weights-edit",
        "llama-sharded-edit", "llama-layer-count", "llama-quantization",
    };

    static readonly ConfigFields LlamaFields = new(
        new[] { "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings", "sliding_window", "bos_token_id", "eos_token_id" },
        new[] { "attention_bias", "mlp_bias", "tie_word_embeddings", "pruned", "use_sliding_window" },
        new[] { "model_type", "hidden_act", "rope_scaling", "rope_theta", "rms_norm_eps", "intermediate_sizes", "num_heads_per_layer", "num_key_value_heads_per_layer", "torch_dtype" });

    /// <summary>What the tensors are written for (the config may say otherwise after a mutation).</summary>
    sealed class LlamaShape
    {
        public int Vocab = 32, Hidden = 16, HeadDim = 4, Layers = 2;
        public int[] Heads = { 4, 4 }, Kv = { 2, 2 }, Inter = { 24, 24 };
        public bool Tied, QkvBias, OBias, MlpBias;
        public string DType = "F32";

        // The HF layout LlamaModel reads (its expected-tensor list is private to the model, so it is spelled here).
        public List<StTensor> Tensors(Random rng)
        {
            var t = new List<StTensor> { MakeTensor(rng, "model.embed_tokens.weight", DType, Vocab, Hidden), MakeTensor(rng, "model.norm.weight", DType, Hidden) };
            if (!Tied) t.Add(MakeTensor(rng, "lm_head.weight", DType, Vocab, Hidden));
            for (int i = 0; i < Layers; i++)
            {
                long h = Hidden, q = Heads[i] * HeadDim, kv = Kv[i] * HeadDim, f = Inter[i];
                foreach (var (name, rows, cols, bias) in new[]
                {
                    ("self_attn.q_proj", q, h, QkvBias), ("self_attn.k_proj", kv, h, QkvBias), ("self_attn.v_proj", kv, h, QkvBias), ("self_attn.o_proj", h, q, OBias),
                    ("mlp.gate_proj", f, h, MlpBias), ("mlp.up_proj", f, h, MlpBias), ("mlp.down_proj", h, f, MlpBias),
                })
                {
                    t.Add(MakeTensor(rng, $"model.layers.{i}.{name}.weight", DType, rows, cols));
                    if (bias) t.Add(MakeTensor(rng, $"model.layers.{i}.{name}.bias", DType, rows));
                }
                t.Add(MakeTensor(rng, $"model.layers.{i}.input_layernorm.weight", DType, h));
                t.Add(MakeTensor(rng, $"model.layers.{i}.post_attention_layernorm.weight", DType, h));
            }
            return t;
        }
    }

    static JsonObject LlamaConfigJson() => new()
    {
        ["architectures"] = new JsonArray("LlamaForCausalLM"), ["model_type"] = "llama", ["vocab_size"] = 32, ["hidden_size"] = 16,
        ["intermediate_size"] = 24, ["num_hidden_layers"] = 2, ["num_attention_heads"] = 4, ["num_key_value_heads"] = 2, ["head_dim"] = 4,
        ["hidden_act"] = "silu", ["max_position_embeddings"] = 16, ["rms_norm_eps"] = 1e-6, ["rope_theta"] = 10000.0,
        ["tie_word_embeddings"] = false, ["bos_token_id"] = 1, ["eos_token_id"] = 2, ["torch_dtype"] = "float32",
        ["attention_bias"] = false, ["mlp_bias"] = false,
    };

    static Built BuildLlama(CasePlan plan, Random rng, string dir)
    {
        var s = new LlamaShape();
        var cfg = new CfgBuild(LlamaConfigJson());
        var j = cfg.Json;
        var tensorEdits = new List<Action<List<StTensor>>>();
        var ckEdits = new List<Action<CkBuild>>();
        int shards = rng.NextDouble() < 0.2 ? 2 : 1;
        bool follow = rng.NextDouble() < 0.6;   // the tensors follow the config edit (a consistent checkpoint) or not
        switch (plan.Mutation)
        {
            case "llama-valid": break;
            case "llama-mistral":
                Set(j, "model_type", "mistral");
                Set(j, "sliding_window", Pick<Func<JsonNode?>>(rng, () => null, () => 2, () => 4096, () => 0, () => -1, () => "4", () => 1L << 40)());
                break;
            case "llama-qwen2":
                Set(j, "model_type", "qwen2");
                s.QkvBias = follow;
                if (rng.NextDouble() < 0.3) Set(j, "use_sliding_window", Pick<JsonNode?>(rng, true, false, "yes"));
                break;
            case "llama-kv-heads":
                {
                    int kv = Pick(rng, 1, 2, 4, 3, 0, 8, -2);
                    Set(j, "num_key_value_heads", kv);
                    if (follow && kv is 1 or 2 or 4) s.Kv = new[] { kv, kv };
                }
                break;
            case "llama-head-dim":
                {
                    JsonNode? hd = Pick<Func<JsonNode?>>(rng, () => 2, () => 6, () => 8, () => 3, () => 0, () => -4, () => null, () => 1 << 30)();
                    if (rng.NextDouble() < 0.2) { j.Remove("head_dim"); Note("-head_dim"); }
                    else Set(j, "head_dim", hd);
                    if (follow && hd is JsonValue v && v.TryGetValue<int>(out int d) && d is 2 or 6 or 8) s.HeadDim = d;
                }
                break;
            case "llama-rope-scaling":
                Set(j, "rope_scaling", Pick<Func<JsonNode?>>(rng,
                    () => new JsonObject { ["type"] = "linear", ["factor"] = 2.0 },
                    () => new JsonObject { ["rope_type"] = "llama3", ["factor"] = 8.0, ["low_freq_factor"] = 1.0, ["high_freq_factor"] = 4.0, ["original_max_position_embeddings"] = 8 },
                    () => new JsonObject { ["rope_type"] = "llama3", ["factor"] = 0, ["low_freq_factor"] = 0, ["high_freq_factor"] = 0, ["original_max_position_embeddings"] = 0 },
                    () => new JsonObject { ["rope_type"] = "llama3", ["factor"] = 8, ["low_freq_factor"] = 1, ["high_freq_factor"] = 4, ["original_max_position_embeddings"] = 1e300 },
                    () => new JsonObject { ["rope_type"] = "yarn", ["factor"] = 2.0 }, () => new JsonObject(), () => new JsonObject { ["rope_type"] = "linear" },
                    () => new JsonObject { ["rope_type"] = "linear", ["factor"] = "2" }, () => new JsonObject { ["rope_type"] = 3 }, () => "linear", () => new JsonArray(), () => null,
                    () => new JsonObject { ["rope_type"] = "linear", ["factor"] = -1e308 })());
                break;
            case "llama-rope-theta": Set(j, Pick(rng, "rope_theta", "rms_norm_eps"), Pick<Func<JsonNode?>>(rng, () => 0, () => -1, () => 1e300, () => "x", () => 1, () => null, () => 1e-300)()); break;
            case "llama-sliding-window":
                Set(j, "model_type", "mistral");
                Set(j, "sliding_window", Pick(rng, 1, 2, 3, int.MaxValue));
                break;
            case "llama-biases":
                {
                    string f = Pick(rng, "attention_bias", "mlp_bias");
                    Set(j, f, Pick<JsonNode?>(rng, true, true, "true", 1));
                    if (follow) { if (f == "attention_bias") s.QkvBias = s.OBias = true; else s.MlpBias = true; }
                }
                break;
            case "llama-tied":
                Set(j, "tie_word_embeddings", Pick<JsonNode?>(rng, true, true, "false", null));
                s.Tied = follow;
                break;
            case "llama-per-layer-lists":
                switch (rng.Next(3))
                {
                    case 0:
                        Set(j, "intermediate_sizes", Pick<Func<JsonNode?>>(rng, () => new JsonArray(12, 24), () => new JsonArray(0, 24), () => new JsonArray(-1, 24),
                            () => new JsonArray(24), () => "24,24", () => new JsonArray(1L << 40, 24), () => new JsonArray(12.5, 24))());
                        if (follow) s.Inter = new[] { 12, 24 };
                        break;
                    case 1:
                        Set(j, "num_heads_per_layer", Pick<Func<JsonNode?>>(rng, () => new JsonArray(2, 4), () => new JsonArray(3, 4), () => new JsonArray(0, 4), () => new JsonArray(4, 4, 4))());
                        Set(j, "num_key_value_heads_per_layer", Pick<Func<JsonNode?>>(rng, () => new JsonArray(1, 2), () => new JsonArray(0, 2), () => null, () => new JsonArray(2, -2))());
                        if (follow) { s.Heads = new[] { 2, 4 }; s.Kv = new[] { 1, 2 }; }
                        break;
                    default:
                        Set(j, "num_key_value_heads_per_layer", Pick<Func<JsonNode?>>(rng, () => new JsonArray(1, 1), () => new JsonArray(4, 4), () => new JsonArray("1", 2), () => new JsonObject())());
                        break;
                }
                break;
            case "llama-hidden-act": Set(j, "hidden_act", Pick<Func<JsonNode?>>(rng, () => "gelu", () => "SiLU", () => null, () => 1, () => "silu ")()); break;
            case "llama-config-edit": MutateConfig(cfg, ConfigMutations[rng.Next(ConfigMutations.Length)], rng, LlamaFields); break;
            case "llama-missing-tensor": tensorEdits.Add(ts => ts.RemoveAt(rng.Next(ts.Count))); break;
            case "llama-transposed":
                tensorEdits.Add(ts =>
                {
                    var twoD = ts.Where(t => t.Shape.Length == 2 && t.Shape[0] != t.Shape[1]).ToList();
                    var v = twoD[rng.Next(twoD.Count)];
                    v.Shape = new[] { v.Shape[1], v.Shape[0] };
                });
                break;
            case "llama-extra-tensor": tensorEdits.Add(ts => ts.Add(MakeTensor(rng, Pick(rng, "model.layers.7.mlp.up_proj.weight", "model.rotary_emb.inv_freq", "lm_head.bias"), "F32", 2))); break;
            case "llama-half-dtype": s.DType = Pick(rng, "F16", "BF16", "F64", "I32"); break;
            case "llama-quantization":
                // A quantization_config of any scheme (or a malformed one), or a quantized tensor without it.
                if (rng.NextDouble() < 0.6)
                    Set(j, Pick(rng, "quantization_config", "quantization_config", "compression_config"), Pick<Func<JsonNode?>>(rng,
                        () => new JsonObject { ["quant_method"] = Pick(rng, "gptq", "awq", "fp8", "compressed-tensors", "bitsandbytes", "hqq", "nope", ""), ["bits"] = Pick<JsonNode?>(rng, 4, 8, "4", null, -1) },
                        () => new JsonObject { ["load_in_8bit"] = Pick<JsonNode?>(rng, true, false, "yes"), ["load_in_4bit"] = Pick<JsonNode?>(rng, true, false, null), ["bnb_4bit_quant_type"] = Pick<JsonNode?>(rng, "nf4", "fp4", 3) },
                        () => new JsonObject { ["quant_method"] = "compressed-tensors", ["format"] = Pick<JsonNode?>(rng, "pack-quantized", "float-quantized", 7), ["config_groups"] = new JsonObject() },
                        () => Pick<JsonNode?>(rng, "gptq", 4, new JsonArray(), true), () => new JsonObject())());
                else
                    tensorEdits.Add(ts => ts.Add(MakeTensor(rng, "model.layers.0.mlp.up_proj." + Pick(rng, "SCB", "qweight", "qzeros", "g_idx", "weight_scale", "weight.absmax", "weight_packed", "weight_format"), Pick(rng, "F32", "I32", "I8", "U8"), 2)));
                break;
            case "llama-weights-edit":
                {
                    string fm = FileMutations[rng.Next(FileMutations.Length)];
                    ckEdits.Add(ck => MutateFile(ck.Shards[rng.Next(ck.Shards.Count)], fm, rng));
                }
                break;
            case "llama-sharded-edit":
                shards = rng.Next(2, 4);
                {
                    string im = IndexMutations[rng.Next(IndexMutations.Length)];
                    ckEdits.Add(ck => MutateCheckpoint(ck, im, rng));
                }
                break;
            case "llama-layer-count": Set(j, "num_hidden_layers", Pick(rng, 1, 3, 0)); break;
            default: throw new InvalidOperationException($"unknown llama mutation {plan.Mutation}");
        }
        return WriteCase(plan, rng, dir, cfg, LlamaFields, s.Tensors, tensorEdits, shards, ckEdits);
    }

    /// <summary>A family case's last steps, shared: stacked config mutations, then the tensors drawn, edited and written.</summary>
    static Built WriteCase(CasePlan plan, Random rng, string dir, CfgBuild cfg, ConfigFields fields, Func<Random, List<StTensor>> draw,
        List<Action<List<StTensor>>> tensorEdits, int shards, List<Action<CkBuild>> ckEdits)
    {
        if (plan.Stack > 1) Stacked(() => MutateConfig(cfg, ConfigMutations[rng.Next(ConfigMutations.Length)], rng, fields));
        var tensors = draw(rng);
        foreach (var e in tensorEdits) e(tensors);
        var ck = new CkBuild(tensors, shards);
        foreach (var e in ckEdits) e(ck);
        ck.Write(dir);
        File.WriteAllBytes(Path.Combine(dir, "config.json"), cfg.Bytes());
        return new Built(dir, null);
    }

    // ------------------------------------------------------------------ Qwen3, Gemma 2, Gemma 3 (text)

    static readonly string[] DecoderMutations =
    {
        "dec-valid", "dec-head-dim", "dec-kv-heads", "dec-qk-norm-shape", "dec-qk-norm-missing", "dec-extra-qk-norm", "dec-norms-missing",
        "dec-softcaps", "dec-query-scalar", "dec-layer-types", "dec-window", "dec-pattern", "dec-rope", "dec-activation", "dec-tied",
        "dec-attention-bias", "dec-per-layer-lists", "dec-config-edit", "dec-missing-tensor", "dec-transposed", "dec-half-dtype",
        "dec-weights-edit", "dec-multimodal", "dec-model-type", "dec-bpe-tokenizer",
    };

    static readonly ConfigFields DecoderFields = new(
        new[] { "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
            "max_position_embeddings", "sliding_window", "sliding_window_pattern", "max_window_layers", "bos_token_id", "eos_token_id" },
        new[] { "attention_bias", "tie_word_embeddings", "pruned", "use_sliding_window", "use_bidirectional_attention" },
        new[] { "model_type", "hidden_act", "hidden_activation", "rope_scaling", "rope_theta", "rope_local_base_freq", "rms_norm_eps", "query_pre_attn_scalar",
            "attn_logit_softcapping", "final_logit_softcapping", "layer_types", "intermediate_sizes", "num_heads_per_layer", "num_key_value_heads_per_layer", "torch_dtype" });

    /// <summary>What the tensors are written for: Qwen3 (two norms, q/k norms), Gemma 2 (four norms), Gemma 3 (four norms, q/k norms).</summary>
    sealed class DecoderShape
    {
        public string Type = "qwen3", DType = "F32";
        public int Vocab = 32, Hidden = 16, HeadDim = 4, Layers = 2, QkNorm = 4;
        public int[] Heads = { 4, 4 }, Kv = { 2, 2 }, Inter = { 24, 24 };
        public bool Tied, Bias, QkNorms = true;
        public bool Gemma => Type != "qwen3";

        // The HF layout Qwen3Model / GemmaModel read (their tensor lists are the families' own, so it is spelled here).
        public List<StTensor> Tensors(Random rng)
        {
            var t = new List<StTensor> { MakeTensor(rng, "model.embed_tokens.weight", DType, Vocab, Hidden), MakeTensor(rng, "model.norm.weight", DType, Hidden) };
            if (!Tied) t.Add(MakeTensor(rng, "lm_head.weight", DType, Vocab, Hidden));
            for (int i = 0; i < Layers; i++)
            {
                string l = $"model.layers.{i}.";
                long h = Hidden, q = Heads[i] * HeadDim, kv = Kv[i] * HeadDim, f = Inter[i];
                foreach (var (name, rows, cols) in new[] { ("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, q) })
                {
                    t.Add(MakeTensor(rng, l + name + ".weight", DType, rows, cols));
                    if (Bias) t.Add(MakeTensor(rng, l + name + ".bias", DType, rows));
                }
                if (QkNorms) { t.Add(MakeTensor(rng, l + "self_attn.q_norm.weight", DType, QkNorm)); t.Add(MakeTensor(rng, l + "self_attn.k_norm.weight", DType, QkNorm)); }
                t.Add(MakeTensor(rng, l + "mlp.gate_proj.weight", DType, f, h));
                t.Add(MakeTensor(rng, l + "mlp.up_proj.weight", DType, f, h));
                t.Add(MakeTensor(rng, l + "mlp.down_proj.weight", DType, h, f));
                foreach (var n in Gemma ? new[] { "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm" }
                    : new[] { "input_layernorm", "post_attention_layernorm" })
                    t.Add(MakeTensor(rng, l + n + ".weight", DType, h));
            }
            return t;
        }
    }

    static JsonObject DecoderConfigJson(string type)
    {
        var j = new JsonObject
        {
            ["model_type"] = type, ["vocab_size"] = 32, ["hidden_size"] = 16, ["intermediate_size"] = 24, ["num_hidden_layers"] = 2,
            ["num_attention_heads"] = 4, ["num_key_value_heads"] = 2, ["head_dim"] = 4, ["max_position_embeddings"] = 16, ["rms_norm_eps"] = 1e-6,
            ["bos_token_id"] = 2, ["eos_token_id"] = 1, ["torch_dtype"] = "float32", ["attention_bias"] = false,
        };
        if (type == "qwen3") { j["hidden_act"] = "silu"; j["rope_theta"] = 1e6; j["tie_word_embeddings"] = false; }
        else
        {
            j["hidden_activation"] = "gelu_pytorch_tanh"; j["query_pre_attn_scalar"] = 4; j["sliding_window"] = 3; j["tie_word_embeddings"] = true;
            if (type == "gemma2") { j["attn_logit_softcapping"] = 50.0; j["final_logit_softcapping"] = 30.0; }
            else { j["rope_local_base_freq"] = 10000.0; j["sliding_window_pattern"] = 2; j["rope_scaling"] = new JsonObject { ["rope_type"] = "linear", ["factor"] = 2.0 }; }
        }
        return j;
    }

    /// <summary>A byte-level BPE tokenizer.json of 32 ids (Qwen's pre-tokenizer): the 26 letters, space as Ġ, merges, added tokens.</summary>
    static JsonObject BpeTokenizerJson()
    {
        var vocab = new JsonObject();
        int id = 0;
        foreach (var c in "abcdefghijklmnopqrstuvwxyz") vocab[c.ToString()] = id++;
        foreach (var t in new[] { "Ġ", "Ġa", "th", "the" }) vocab[t] = id++;
        var split = new JsonObject { ["type"] = "Split", ["pattern"] = new JsonObject { ["Regex"] = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+" }, ["behavior"] = "Isolated", ["invert"] = false };
        return new JsonObject
        {
            ["version"] = "1.0", ["normalizer"] = new JsonObject { ["type"] = "NFC" },
            ["added_tokens"] = new JsonArray(new JsonObject { ["id"] = 30, ["content"] = "<|endoftext|>", ["special"] = true }, new JsonObject { ["id"] = 31, ["content"] = "<think>", ["special"] = false }),
            ["pre_tokenizer"] = new JsonObject { ["type"] = "Sequence", ["pretokenizers"] = new JsonArray(split, new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = false }) },
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel" },
            ["model"] = new JsonObject { ["type"] = "BPE", ["vocab"] = vocab, ["merges"] = new JsonArray("Ġ a", "t h", "th e") },
        };
    }

    static Built BuildDecoder(CasePlan plan, Random rng, string dir)
    {
        var s = new DecoderShape { Type = Pick(rng, "qwen3", "gemma2", "gemma3_text") };
        s.QkNorms = s.Type != "gemma2";
        s.Tied = s.Gemma;
        var cfg = new CfgBuild(DecoderConfigJson(s.Type));
        var j = cfg.Json;
        var tensorEdits = new List<Action<List<StTensor>>>();
        var ckEdits = new List<Action<CkBuild>>();
        int shards = rng.NextDouble() < 0.2 ? 2 : 1;
        bool follow = rng.NextDouble() < 0.6;
        JsonObject? tokenizer = null;
        Note(s.Type);
        switch (plan.Mutation)
        {
            case "dec-valid": break;
            case "dec-head-dim":
                {
                    JsonNode? hd = Pick<Func<JsonNode?>>(rng, () => 2, () => 8, () => 3, () => 0, () => null, () => 1 << 30)();
                    if (rng.NextDouble() < 0.3) { j.Remove("head_dim"); Note("-head_dim"); }   // qwen3: 128, gemma: 256 by default
                    else Set(j, "head_dim", hd);
                    if (follow && hd is JsonValue v && v.TryGetValue<int>(out int d) && d is 2 or 8) s.HeadDim = s.QkNorm = d;
                }
                break;
            case "dec-kv-heads":
                {
                    JsonNode? kv = Pick<Func<JsonNode?>>(rng, () => 1, () => 4, () => 3, () => 0, () => null)();
                    if (kv is null) { j.Remove("num_key_value_heads"); Note("-num_key_value_heads"); }   // qwen3: 32, gemma: 4 by default
                    else Set(j, "num_key_value_heads", kv);
                    if (follow && kv is JsonValue v && v.TryGetValue<int>(out int k) && k is 1 or 4) s.Kv = new[] { k, k };
                }
                break;
            case "dec-qk-norm-shape": s.QkNorm = Pick(rng, 3, 8, 16, 1); break;
            case "dec-qk-norm-missing": s.QkNorms = false; break;
            case "dec-extra-qk-norm": s.QkNorms = true; break;
            case "dec-norms-missing": tensorEdits.Add(ts => ts.RemoveAll(t => t.Name.EndsWith(Pick(rng, "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight", "input_layernorm.weight"), StringComparison.Ordinal))); break;
            case "dec-softcaps": Set(j, Pick(rng, "attn_logit_softcapping", "final_logit_softcapping"), Pick<Func<JsonNode?>>(rng, () => null, () => 0, () => -1, () => 1e-300, () => 1e300, () => "30", () => true)()); break;
            case "dec-query-scalar": Set(j, "query_pre_attn_scalar", Pick<Func<JsonNode?>>(rng, () => 0, () => -4, () => 1e-300, () => 1e300, () => "4", () => null)()); break;
            case "dec-layer-types":
                Set(j, "layer_types", Pick<Func<JsonNode?>>(rng, () => new JsonArray("sliding_attention", "full_attention"), () => new JsonArray("full_attention"),
                    () => new JsonArray("sliding_attention", "global"), () => new JsonArray(1, 2), () => "sliding_attention", () => new JsonObject(), () => null)());
                break;
            case "dec-window":
                Set(j, "sliding_window", Pick<Func<JsonNode?>>(rng, () => 1, () => 0, () => -3, () => int.MaxValue, () => "3", () => null)());
                if (s.Type == "qwen3") { Set(j, "use_sliding_window", true); Set(j, "max_window_layers", Pick(rng, 0, 1, 5, -1)); }
                break;
            case "dec-pattern": Set(j, "sliding_window_pattern", Pick<Func<JsonNode?>>(rng, () => 1, () => 0, () => -2, () => 1 << 30, () => "6", () => null)()); break;
            case "dec-rope":
                Set(j, Pick(rng, "rope_theta", "rope_local_base_freq", "rope_scaling", "rope_parameters"), Pick<Func<JsonNode?>>(rng, () => 0, () => -1, () => 1e300, () => "x",
                    () => new JsonObject { ["rope_type"] = "linear", ["factor"] = 0.0 }, () => new JsonObject { ["rope_type"] = "yarn", ["factor"] = 4.0 },
                    () => new JsonObject { ["full_attention"] = new JsonObject { ["rope_type"] = "default" } }, () => null)());
                break;
            case "dec-activation": Set(j, Pick(rng, "hidden_act", "hidden_activation"), Pick<Func<JsonNode?>>(rng, () => "gelu", () => "relu", () => "silu", () => null, () => 1, () => "gelu_pytorch_tanh ")()); break;
            case "dec-tied":
                Set(j, "tie_word_embeddings", Pick<JsonNode?>(rng, true, false, "false", null));
                if (follow) s.Tied = !s.Tied;
                break;
            case "dec-attention-bias":
                Set(j, "attention_bias", Pick<JsonNode?>(rng, true, true, "true", 1));
                s.Bias = follow;
                break;
            case "dec-per-layer-lists":
                Set(j, Pick(rng, "intermediate_sizes", "num_heads_per_layer", "num_key_value_heads_per_layer"), Pick<Func<JsonNode?>>(rng,
                    () => new JsonArray(12, 24), () => new JsonArray(24, 24), () => new JsonArray(2, 4), () => new JsonArray(1, 2), () => new JsonArray(0, 24),
                    () => new JsonArray(24), () => new JsonArray(-1, 24), () => "24")());
                if (follow && j["intermediate_sizes"] is JsonArray { Count: 2 } a && a.All(x => x is JsonValue xv && xv.TryGetValue<int>(out int n) && n > 0))
                    s.Inter = a.Select(x => (int)x!).ToArray();
                break;
            case "dec-config-edit": MutateConfig(cfg, ConfigMutations[rng.Next(ConfigMutations.Length)], rng, DecoderFields); break;
            case "dec-missing-tensor": tensorEdits.Add(ts => ts.RemoveAt(rng.Next(ts.Count))); break;
            case "dec-transposed":
                tensorEdits.Add(ts =>
                {
                    var twoD = ts.Where(t => t.Shape.Length == 2 && t.Shape[0] != t.Shape[1]).ToList();
                    var v = twoD[rng.Next(twoD.Count)];
                    v.Shape = new[] { v.Shape[1], v.Shape[0] };
                });
                break;
            case "dec-half-dtype": s.DType = Pick(rng, "F16", "BF16", "F64", "I32"); break;
            case "dec-weights-edit":
                {
                    string fm = FileMutations[rng.Next(FileMutations.Length)];
                    ckEdits.Add(ck => MutateFile(ck.Shards[rng.Next(ck.Shards.Count)], fm, rng));
                }
                break;
            case "dec-multimodal":
                cfg.Json = j = new JsonObject { ["model_type"] = "gemma3", ["text_config"] = DecoderConfigJson("gemma3_text"), ["vision_config"] = new JsonObject() };
                break;
            case "dec-model-type": Set(j, "model_type", Pick<Func<JsonNode?>>(rng, () => "gemma", () => "gemma3", () => "qwen3_moe", () => "Qwen3", () => "gemma3_text", () => "gemma2")()); break;
            case "dec-bpe-tokenizer":
                {
                    // A Qwen3 checkpoint with a tokenizer.json, exported to GGUF as well (the byte-level BPE vocabulary parser).
                    s.Type = "qwen3"; s.QkNorms = true; s.Tied = false;
                    cfg.Json = j = DecoderConfigJson("qwen3");
                    tokenizer = BpeTokenizerJson();
                    var model = tokenizer["model"]!.AsObject();
                    switch (rng.Next(8))
                    {
                        case 0: break;
                        case 1: model["vocab"]!["a"] = Pick<JsonNode?>(rng, 40, -1, "0", 1L << 40, 5); break;
                        case 2: model["merges"] = Pick<Func<JsonNode?>>(rng, () => new JsonArray("a"), () => new JsonArray(new JsonArray("a", "b", "c")), () => new JsonArray(1), () => "a b", () => null)(); break;
                        case 3: tokenizer["pre_tokenizer"] = Pick<Func<JsonNode?>>(rng, () => null, () => new JsonObject { ["type"] = "Whitespace" }, () => new JsonArray(), () => new JsonObject { ["type"] = "Sequence", ["pretokenizers"] = new JsonObject() })(); break;
                        case 4: tokenizer["added_tokens"] = Pick<Func<JsonNode?>>(rng, () => new JsonArray(new JsonObject { ["id"] = 3, ["content"] = "<x>" }), () => new JsonArray(new JsonObject { ["id"] = 99, ["content"] = "<x>" }), () => new JsonArray(1), () => new JsonObject())(); break;
                        case 5: model["type"] = Pick<JsonNode?>(rng, "WordPiece", "Unigram", null, 3); break;
                        case 6: tokenizer["normalizer"] = Pick<Func<JsonNode?>>(rng, () => new JsonObject { ["type"] = "NFKC" }, () => new JsonObject { ["type"] = "Lowercase" }, () => "NFC")(); break;
                        default: model["byte_fallback"] = true; break;
                    }
                }
                break;
            default: throw new InvalidOperationException($"unknown decoder mutation {plan.Mutation}");
        }
        var built = WriteCase(plan, rng, dir, cfg, DecoderFields, s.Tensors, tensorEdits, shards, ckEdits);
        if (tokenizer is not null) File.WriteAllText(Path.Combine(dir, "tokenizer.json"), tokenizer.ToJsonString());
        return built;
    }

    /// <summary>Opens a decoder case as the CLI does, and where it carries a tokenizer.json also exports it to GGUF.</summary>
    static void OpenDecoder(string dir)
    {
        OpenFamilyModel(dir);
        if (!File.Exists(Path.Combine(dir, "tokenizer.json"))) return;
        string gguf = Path.Combine(dir, "out.gguf");
        LlmSnp.Export.GgufExport.Run(dir, gguf, LlmSnp.Export.GgufDType.F32);
        File.Delete(gguf);
    }

    // ------------------------------------------------------------------ mixtures (Mixtral, Qwen3-MoE)

    static readonly string[] MixtureMutations =
    {
        "moe-valid", "moe-qwen3", "moe-experts-count", "moe-top-k", "moe-router-rows", "moe-extra-expert", "moe-mlp-only",
        "moe-sparse-step", "moe-expert-widths", "moe-norm-topk", "moe-config-edit", "moe-missing-tensor", "moe-transposed",
        "moe-half-dtype",
    };

    static readonly ConfigFields MixtureFields = new(
        new[] { "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
            "moe_intermediate_size", "num_local_experts", "num_experts", "num_experts_per_tok", "decoder_sparse_step", "max_position_embeddings" },
        new[] { "norm_topk_prob", "tie_word_embeddings", "pruned", "attention_bias", "use_sliding_window" },
        new[] { "model_type", "hidden_act", "rope_scaling", "rope_theta", "rms_norm_eps", "mlp_only_layers", "expert_intermediate_sizes", "num_heads_per_layer", "torch_dtype" });

    /// <summary>What a mixture case's tensors are written for: Mixtral (hub names) or Qwen3-MoE (q/k norms, a dense layer).</summary>
    sealed class MixtureShape
    {
        public bool Qwen;
        public int Vocab = 32, Hidden = 16, HeadDim = 4, Heads = 4, Kv = 2, Layers = 2, Experts = 4, Width = 8, Dense = 12, ExtraExpert = -1, RouterRows = -1;
        public int[] DenseLayers = Array.Empty<int>();
        public string DType = "F32";

        public List<StTensor> Tensors(Random rng)
        {
            var t = new List<StTensor> { MakeTensor(rng, "model.embed_tokens.weight", DType, Vocab, Hidden), MakeTensor(rng, "model.norm.weight", DType, Hidden),
                MakeTensor(rng, "lm_head.weight", DType, Vocab, Hidden) };
            string moe = Qwen ? "mlp" : "block_sparse_moe";
            var (gate, up, down) = Qwen ? ("gate_proj", "up_proj", "down_proj") : ("w1", "w3", "w2");
            for (int i = 0; i < Layers; i++)
            {
                string l = $"model.layers.{i}.";
                long h = Hidden, q = Heads * HeadDim, kv = Kv * HeadDim;
                foreach (var (name, rows, cols) in new[] { ("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q) })
                    t.Add(MakeTensor(rng, $"{l}self_attn.{name}.weight", DType, rows, cols));
                if (Qwen) { t.Add(MakeTensor(rng, $"{l}self_attn.q_norm.weight", DType, HeadDim)); t.Add(MakeTensor(rng, $"{l}self_attn.k_norm.weight", DType, HeadDim)); }
                if (DenseLayers.Contains(i))
                    foreach (var (name, rows, cols) in new[] { ("gate_proj", (long)Dense, h), ("up_proj", Dense, h), ("down_proj", h, Dense) })
                        t.Add(MakeTensor(rng, $"{l}mlp.{name}.weight", DType, rows, cols));
                else
                {
                    t.Add(MakeTensor(rng, $"{l}{moe}.gate.weight", DType, RouterRows > 0 ? RouterRows : Experts, h));
                    for (int e = 0; e < Experts + (ExtraExpert == i ? 1 : 0); e++)
                    {
                        t.Add(MakeTensor(rng, $"{l}{moe}.experts.{e}.{gate}.weight", DType, Width, h));
                        t.Add(MakeTensor(rng, $"{l}{moe}.experts.{e}.{up}.weight", DType, Width, h));
                        t.Add(MakeTensor(rng, $"{l}{moe}.experts.{e}.{down}.weight", DType, h, Width));
                    }
                }
                t.Add(MakeTensor(rng, $"{l}input_layernorm.weight", DType, h));
                t.Add(MakeTensor(rng, $"{l}post_attention_layernorm.weight", DType, h));
            }
            return t;
        }
    }

    static JsonObject MixtralConfigJson() => new()
    {
        ["architectures"] = new JsonArray("MixtralForCausalLM"), ["model_type"] = "mixtral", ["vocab_size"] = 32, ["hidden_size"] = 16,
        ["intermediate_size"] = 8, ["num_hidden_layers"] = 2, ["num_attention_heads"] = 4, ["num_key_value_heads"] = 2, ["head_dim"] = 4,
        ["num_local_experts"] = 4, ["num_experts_per_tok"] = 2, ["hidden_act"] = "silu", ["max_position_embeddings"] = 16, ["rms_norm_eps"] = 1e-5,
        ["rope_theta"] = 1e6, ["tie_word_embeddings"] = false, ["bos_token_id"] = 1, ["eos_token_id"] = 2, ["torch_dtype"] = "float32",
    };

    static Built BuildMixture(CasePlan plan, Random rng, string dir)
    {
        var s = new MixtureShape();
        var cfg = new CfgBuild(MixtralConfigJson());
        var j = cfg.Json;
        var tensorEdits = new List<Action<List<StTensor>>>();
        var ckEdits = new List<Action<CkBuild>>();
        bool follow = rng.NextDouble() < 0.6;
        void ToQwen()
        {
            s.Qwen = true;
            Set(j, "model_type", "qwen3_moe");
            j.Remove("num_local_experts");
            Set(j, "num_experts", 4); Set(j, "moe_intermediate_size", 8); Set(j, "intermediate_size", 12); Set(j, "norm_topk_prob", true);
            Set(j, "mlp_only_layers", new JsonArray(1));
            s.DenseLayers = new[] { 1 };
        }
        string expertsField() => s.Qwen ? "num_experts" : "num_local_experts";
        switch (plan.Mutation)
        {
            case "moe-valid": break;
            case "moe-qwen3": ToQwen(); break;
            case "moe-experts-count":
                {
                    if (rng.NextDouble() < 0.5) ToQwen();
                    JsonNode? v = Pick<Func<JsonNode?>>(rng, () => 3, () => 5, () => 0, () => -1, () => 1, () => "4", () => 1 << 30)();
                    Set(j, expertsField(), v);
                    if (follow && v is JsonValue x && x.TryGetValue<int>(out int n) && n is 3 or 5 or 1) s.Experts = n;
                }
                break;
            case "moe-top-k": Set(j, "num_experts_per_tok", Pick<Func<JsonNode?>>(rng, () => 0, () => 5, () => 4, () => 1, () => -2, () => 2.5, () => null)()); break;
            case "moe-router-rows": s.RouterRows = Pick(rng, 3, 5, 1); break;
            case "moe-extra-expert": s.ExtraExpert = rng.Next(2); break;
            case "moe-mlp-only":
                ToQwen();
                {
                    JsonNode? v = Pick<Func<JsonNode?>>(rng, () => new JsonArray(), () => new JsonArray(0), () => new JsonArray(0, 1), () => new JsonArray(2),
                        () => new JsonArray(-1), () => new JsonArray("1"), () => 1, () => new JsonArray(1, 1))();
                    Set(j, "mlp_only_layers", v);
                    if (follow && v is JsonArray a && a.All(x => x is JsonValue xv && xv.TryGetValue<int>(out int k) && k is 0 or 1)) s.DenseLayers = a.Select(x => (int)x!).Distinct().ToArray();
                }
                break;
            case "moe-sparse-step":
                ToQwen();
                Set(j, "decoder_sparse_step", Pick<Func<JsonNode?>>(rng, () => 0, () => -1, () => 2, () => 3, () => 1 << 30, () => "1")());
                break;
            case "moe-expert-widths":
                Set(j, "expert_intermediate_sizes", Pick<Func<JsonNode?>>(rng, () => new JsonArray(new JsonArray(8, 8, 8, 8), new JsonArray(8, 8, 8, 8)),
                    () => new JsonArray(new JsonArray(4, 8, 8, 8), new JsonArray(8, 8, 8, 8)), () => new JsonArray(new JsonArray(8, 8, 8), new JsonArray(8, 8, 8, 8)),
                    () => new JsonArray(new JsonArray(0, 8, 8, 8), new JsonArray(8, 8, 8, 8)), () => new JsonArray(8, 8), () => "8", () => new JsonArray(new JsonArray(), new JsonArray()))());
                break;
            case "moe-norm-topk": ToQwen(); Set(j, "norm_topk_prob", Pick<Func<JsonNode?>>(rng, () => false, () => "true", () => 1, () => null)()); break;
            case "moe-config-edit": if (rng.NextDouble() < 0.5) ToQwen(); MutateConfig(cfg, ConfigMutations[rng.Next(ConfigMutations.Length)], rng, MixtureFields); break;
            case "moe-missing-tensor": if (rng.NextDouble() < 0.5) ToQwen(); tensorEdits.Add(ts => ts.RemoveAt(rng.Next(ts.Count))); break;
            case "moe-transposed":
                tensorEdits.Add(ts =>
                {
                    var twoD = ts.Where(t => t.Shape.Length == 2 && t.Shape[0] != t.Shape[1]).ToList();
                    var v = twoD[rng.Next(twoD.Count)];
                    v.Shape = new[] { v.Shape[1], v.Shape[0] };
                });
                break;
            case "moe-half-dtype": s.DType = Pick(rng, "F16", "BF16", "F64", "I32"); break;
            default: throw new InvalidOperationException($"unknown mixture mutation {plan.Mutation}");
        }
        return WriteCase(plan, rng, dir, cfg, MixtureFields, s.Tensors, tensorEdits, 1, ckEdits);
    }

    // ------------------------------------------------------------------ ViT / DeiT

    static readonly string[] VitMutations =
    {
        "vit-valid", "vit-deit", "vit-image-size", "vit-patch-size", "vit-pruned-heads", "vit-intermediate-sizes", "vit-heads-per-layer",
        "vit-hidden-act", "vit-qkv-bias", "vit-channels", "vit-classes", "vit-config-edit", "vit-missing-tensor", "vit-transposed",
        "vit-half-dtype", "vit-weights-edit", "vit-sharded-edit",
    };

    static readonly ConfigFields VitFields = new(
        new[] { "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size", "num_channels" },
        new[] { "qkv_bias", "pruned" },
        new[] { "model_type", "hidden_act", "pruned_heads", "intermediate_sizes", "num_heads_per_layer", "layer_norm_eps", "torch_dtype" });

    sealed class VitShape
    {
        public string Prefix = "vit.", DType = "F32";
        public int Hidden = 8, HeadDim = 4, Layers = 2, Image = 8, Patch = 4, Channels = 3, Classes = 3;
        public int[] Heads = { 2, 2 }, Mlp = { 16, 16 };

        // Outer tensors as VitModel names them (private there); block tensors from VitBlock's own table.
        public List<StTensor> Tensors(Random rng)
        {
            int tokens = 1 + (Image / Patch) * (Image / Patch);
            var t = new List<StTensor>
            {
                MakeTensor(rng, Prefix + "embeddings.cls_token", DType, 1, 1, Hidden),
                MakeTensor(rng, Prefix + "embeddings.position_embeddings", DType, 1, tokens, Hidden),
                MakeTensor(rng, Prefix + "embeddings.patch_embeddings.projection.weight", DType, Hidden, Channels, Patch, Patch),
                MakeTensor(rng, Prefix + "embeddings.patch_embeddings.projection.bias", DType, Hidden),
                MakeTensor(rng, Prefix + "layernorm.weight", DType, Hidden), MakeTensor(rng, Prefix + "layernorm.bias", DType, Hidden),
                MakeTensor(rng, "classifier.weight", DType, Classes, Hidden), MakeTensor(rng, "classifier.bias", DType, Classes),
            };
            for (int i = 0; i < Layers; i++)
            {
                var shapes = VitBlock.Shapes((long)Heads[i] * HeadDim, Mlp[i], Hidden);
                for (int k = 0; k < VitBlock.Names.Length; k++)
                    t.Add(MakeTensor(rng, $"{Prefix}encoder.layer.{i}.{VitBlock.Names[k].Hf}", DType, shapes[k]));
            }
            return t;
        }
    }

    static JsonObject VitConfigJson() => new()
    {
        ["model_type"] = "vit", ["hidden_size"] = 8, ["num_hidden_layers"] = 2, ["num_attention_heads"] = 2, ["intermediate_size"] = 16,
        ["image_size"] = 8, ["patch_size"] = 4, ["num_channels"] = 3, ["layer_norm_eps"] = 1e-12, ["hidden_act"] = "gelu", ["qkv_bias"] = true,
    };

    static Built BuildVit(CasePlan plan, Random rng, string dir)
    {
        var s = new VitShape();
        var cfg = new CfgBuild(VitConfigJson());
        var j = cfg.Json;
        var tensorEdits = new List<Action<List<StTensor>>>();
        var ckEdits = new List<Action<CkBuild>>();
        int shards = rng.NextDouble() < 0.2 ? 2 : 1;
        bool follow = rng.NextDouble() < 0.6;
        switch (plan.Mutation)
        {
            case "vit-valid": break;
            case "vit-deit":
                Set(j, "model_type", "deit");
                if (follow) s.Prefix = "deit.";
                break;
            case "vit-image-size":
                {
                    JsonNode? v = Pick<Func<JsonNode?>>(rng, () => 16, () => 12, () => 0, () => -8, () => new JsonArray(8, 8), () => "8", () => 1 << 30, () => 4)();
                    Set(j, "image_size", v);
                    if (follow && v is JsonValue x && x.TryGetValue<int>(out int n) && n is 16 or 12 or 4) s.Image = n;
                }
                break;
            case "vit-patch-size":
                {
                    JsonNode? v = Pick<Func<JsonNode?>>(rng, () => 2, () => 3, () => 0, () => -4, () => new JsonArray(4, 4), () => 1 << 30, () => 8)();
                    Set(j, "patch_size", v);
                    if (follow && v is JsonValue x && x.TryGetValue<int>(out int n) && n is 2 or 8) s.Patch = n;
                }
                break;
            case "vit-pruned-heads":
                {
                    int k = rng.Next(6);
                    Set(j, "pruned_heads", k switch
                    {
                        0 => new JsonObject { ["0"] = new JsonArray(1) },
                        1 => new JsonObject { ["5"] = new JsonArray(0) },
                        2 => new JsonObject { ["x"] = new JsonArray(0) },
                        3 => new JsonObject { ["0"] = "a" },
                        4 => new JsonObject { ["0"] = new JsonArray(0, 1) },
                        _ => new JsonObject { ["1"] = new JsonArray(0, 0, 1) },
                    });
                    if (follow && k == 0) s.Heads = new[] { 1, 2 };
                }
                break;
            case "vit-intermediate-sizes":
                Set(j, "intermediate_sizes", Pick<Func<JsonNode?>>(rng, () => new JsonArray(8, 16), () => new JsonArray(0, 16), () => new JsonArray(-1, 16),
                    () => new JsonArray(16), () => "x", () => new JsonArray(1L << 40, 16))());
                if (follow) s.Mlp = new[] { 8, 16 };
                break;
            case "vit-heads-per-layer":
                Set(j, "num_heads_per_layer", Pick<Func<JsonNode?>>(rng, () => new JsonArray(1, 2), () => new JsonArray(0, 2), () => new JsonArray(3, 2), () => new JsonArray(-1, 2), () => new JsonArray(2))());
                if (follow) s.Heads = new[] { 1, 2 };
                break;
            case "vit-hidden-act": Set(j, "hidden_act", Pick<Func<JsonNode?>>(rng, () => "gelu_new", () => "relu", () => null, () => 5, () => "GELU")()); break;
            case "vit-qkv-bias": Set(j, "qkv_bias", Pick<JsonNode?>(rng, false, "true", null, 0)); break;
            case "vit-channels":
                {
                    int c = Pick(rng, 1, 0, -3, 4);
                    Set(j, "num_channels", c);
                    if (follow && c > 0) s.Channels = c;
                }
                break;
            case "vit-classes": s.Classes = Pick(rng, 1, 0, 2); break;
            case "vit-config-edit": MutateConfig(cfg, ConfigMutations[rng.Next(ConfigMutations.Length)], rng, VitFields); break;
            case "vit-missing-tensor": tensorEdits.Add(ts => ts.RemoveAt(rng.Next(ts.Count))); break;
            case "vit-transposed":
                tensorEdits.Add(ts =>
                {
                    var twoD = ts.Where(t => t.Shape.Length == 2 && t.Shape[0] != t.Shape[1]).ToList();
                    var v = twoD[rng.Next(twoD.Count)];
                    v.Shape = new[] { v.Shape[1], v.Shape[0] };
                });
                break;
            case "vit-half-dtype": s.DType = Pick(rng, "F16", "BF16", "F64", "I32"); break;
            case "vit-weights-edit":
                {
                    string fm = FileMutations[rng.Next(FileMutations.Length)];
                    ckEdits.Add(ck => MutateFile(ck.Shards[rng.Next(ck.Shards.Count)], fm, rng));
                }
                break;
            case "vit-sharded-edit":
                shards = rng.Next(2, 4);
                {
                    string im = IndexMutations[rng.Next(IndexMutations.Length)];
                    ckEdits.Add(ck => MutateCheckpoint(ck, im, rng));
                }
                break;
            default: throw new InvalidOperationException($"unknown vit mutation {plan.Mutation}");
        }
        return WriteCase(plan, rng, dir, cfg, VitFields, s.Tensors, tensorEdits, shards, ckEdits);
    }

    // ------------------------------------------------------------------ tokenizer files

    static readonly string[] TokenizerMutations =
    {
        "sp-valid", "sp-truncated", "sp-byte-flips", "sp-bad-length", "sp-piece-type", "sp-score", "sp-empty", "sp-garbage",
        "sp-drop-fields", "sp-duplicate-pieces", "sp-tokenizer-config",
        "hf-valid", "hf-truncated", "hf-byte-flips", "hf-non-utf8", "hf-model-type", "hf-vocab", "hf-unk", "hf-deep", "hf-empty",
        "hf-truncation", "hf-padding",
        "bpe-valid", "bpe-vocab-truncated", "bpe-vocab-byte-flips", "bpe-vocab-wrong-type", "bpe-merges-bad", "bpe-merges-non-utf8",
        "bpe-missing-merges", "bpe-bos-moved", "bpe-vocab-huge-id",
    };

    /// <summary>stories260K's SentencePiece model (512 pieces): a real protobuf to mutate.</summary>
    static readonly Lazy<byte[]> SpModel = new(() => File.ReadAllBytes(Path.Combine(RepoPaths.Root, "models", "stories260k", "tokenizer.model")));

    static readonly string[] Words = { "[UNK]", "once", "upon", "a", "time", "lily", "saw", "big", "dog", ",", "." };

    static JsonObject HfTokenizerJson() => new()
    {
        ["version"] = "1.0", ["truncation"] = null, ["padding"] = null,
        ["added_tokens"] = new JsonArray(new JsonObject { ["id"] = 0, ["content"] = "[UNK]", ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false, ["normalized"] = false, ["special"] = true }),
        ["normalizer"] = new JsonObject { ["type"] = "Lowercase" },
        ["pre_tokenizer"] = new JsonObject { ["type"] = "Whitespace" },
        ["post_processor"] = null, ["decoder"] = null,
        ["model"] = new JsonObject
        {
            ["type"] = "WordLevel",
            ["vocab"] = new JsonObject(Words.Select((w, i) => KeyValuePair.Create(w, (JsonNode?)i))),
            ["unk_token"] = "[UNK]",
        },
    };

    /// <summary>GPT-2's byte → printable-character map (the byte-level alphabet of vocab.json).</summary>
    static char[] ByteChars()
    {
        var map = new char[256];
        int n = 0;
        for (int b = 0; b < 256; b++)
        {
            bool printable = b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;
            map[b] = printable ? (char)b : (char)(256 + n++);
        }
        return map;
    }

    static readonly string[] MergePairs = { "Ġ t", "h e", "Ġt he", "i n", "o n", "Ġ a", "Ġ s", "Ġ d", "o g" };

    /// <summary>A 269-token byte-level BPE with OPT's specials (&lt;/s&gt; = 2).</summary>
    static (JsonObject Vocab, string Merges) TinyBpe()
    {
        var v = new JsonObject { ["<s>"] = 0, ["<pad>"] = 1, ["</s>"] = 2, ["<unk>"] = 3 };
        foreach (char c in ByteChars()) v[c.ToString()] = v.Count;
        foreach (var p in MergePairs) v[p.Replace(" ", "")] = v.Count;
        return (v, "#version: 0.2\n" + string.Join("\n", MergePairs) + "\n");
    }

    /// <summary>Offsets of the varints that give the length of length-delimited fields (top level and one level down).</summary>
    static List<(int At, int Size, ulong Value)> ProtoLengths(byte[] b)
    {
        var found = new List<(int, int, ulong)>();
        void Walk(int from, int to, int depth)
        {
            int i = from;
            while (i < to)
            {
                if (!Varint(b, ref i, to, out ulong tag)) return;
                switch (tag & 7)
                {
                    case 0: if (!Varint(b, ref i, to, out _)) return; break;
                    case 1: i += 8; break;
                    case 5: i += 4; break;
                    case 2:
                        {
                            int at = i;
                            if (!Varint(b, ref i, to, out ulong len) || len > (ulong)(to - i)) return;
                            found.Add((at, i - at, len));
                            if (depth == 0) Walk(i, i + (int)len, 1);
                            i += (int)len;
                        }
                        break;
                    default: return;
                }
            }
        }
        Walk(0, b.Length, 0);
        return found;
    }

    static bool Varint(byte[] b, ref int i, int to, out ulong v)
    {
        v = 0;
        for (int shift = 0; shift < 64 && i < to; shift += 7)
        {
            byte x = b[i++];
            v |= (ulong)(x & 0x7F) << shift;
            if ((x & 0x80) == 0) return true;
        }
        return false;
    }

    static byte[] EncodeVarint(ulong v)
    {
        var o = new List<byte>();
        do { byte x = (byte)(v & 0x7F); v >>= 7; if (v != 0) x |= 0x80; o.Add(x); } while (v != 0);
        return o.ToArray();
    }

    static byte[] Splice(byte[] a, int at, int remove, byte[] insert) => a[..at].Concat(insert).Concat(a[(at + remove)..]).ToArray();

    static Built BuildTokenizer(CasePlan plan, Random rng, string dir)
    {
        string m = plan.Mutation;
        if (m.StartsWith("sp-"))
        {
            byte[] b = SpModel.Value;
            var lens = ProtoLengths(b);
            switch (m)
            {
                case "sp-valid": break;
                case "sp-truncated": b = b[..rng.Next(b.Length)]; Note($"truncated to {b.Length}"); break;
                case "sp-byte-flips": b = Flip(b.ToArray(), rng, 0, b.Length, rng.Next(1, 8)); break;
                case "sp-bad-length":
                    {
                        var (at, size, len) = lens[rng.Next(lens.Count)];
                        ulong nv = Pick<Func<ulong>>(rng, () => len + (ulong)rng.Next(1, 5), () => len == 0 ? 1 : len - 1, () => 0, () => uint.MaxValue,
                            () => ulong.MaxValue, () => (ulong)int.MaxValue + 1, () => (ulong)b.Length)();
                        Note($"length at {at}: {len} → {nv}");
                        b = Splice(b, at, size, EncodeVarint(nv));
                    }
                    break;
                case "sp-piece-type":
                case "sp-score":
                    {
                        // Inside a piece (top-level field 1): type is field 3 (varint), score field 2 (float).
                        byte tag = m == "sp-piece-type" ? (byte)0x18 : (byte)0x15;
                        var hits = Enumerable.Range(0, b.Length - 5).Where(i => b[i] == tag).ToList();
                        if (hits.Count == 0) break;
                        int at = hits[rng.Next(hits.Count)] + 1;
                        b = b.ToArray();
                        if (tag == 0x18) b = Splice(b, at, 1, EncodeVarint(Pick(rng, 0UL, 5UL, 6UL, 7UL, 127UL, ulong.MaxValue)));
                        else BitConverter.TryWriteBytes(b.AsSpan(at, 4), Pick(rng, float.NaN, float.PositiveInfinity, float.NegativeInfinity, float.MaxValue, -0f));
                    }
                    break;
                case "sp-empty": b = Array.Empty<byte>(); break;
                case "sp-garbage": b = new byte[rng.Next(1, 64)]; rng.NextBytes(b); break;
                case "sp-drop-fields":
                    {
                        // Keep a prefix of the top-level fields: no pieces at all, or no normalizer/trainer spec.
                        var top = lens.Where(l => l.At > 0 && (b[l.At - 1] & 7) == 2).Select(l => l.At - 1).Distinct().ToList();
                        int cut = top.Count == 0 ? 0 : top[rng.Next(top.Count)];
                        b = rng.NextDouble() < 0.5 ? b[..cut] : b[cut..];
                    }
                    break;
                case "sp-duplicate-pieces":
                    {
                        var first = lens[0];
                        int start = first.At - 1, end = first.At + first.Size + (int)first.Value;
                        var piece = b[start..end];
                        b = b.Concat(Enumerable.Repeat(piece, rng.Next(1, 4)).SelectMany(x => x)).ToArray();
                    }
                    break;
                case "sp-tokenizer-config":
                    File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), Pick(rng, "{\"add_bos_token\": false}", "{\"add_bos_token\": \"no\"}", "[]", "{", "", "null", "{\"add_bos_token\": null}"));
                    break;
            }
            File.WriteAllBytes(Path.Combine(dir, "tokenizer.model"), b);
            if (plan.Stack > 1 && rng.NextDouble() < 0.5) File.WriteAllBytes(Path.Combine(dir, "tokenizer.json"), Utf8("{"));   // ignored: tokenizer.model wins
            return new Built(dir, null);
        }
        if (m.StartsWith("hf-"))
        {
            var c = new CfgBuild(HfTokenizerJson());
            var model = c.Json["model"]!.AsObject();
            switch (m)
            {
                case "hf-valid": break;
                case "hf-truncated": c.Edits.Add(x => x[..rng.Next(x.Length)]); break;
                case "hf-byte-flips": c.Edits.Add(x => Flip(x, rng, 0, x.Length, rng.Next(1, 6))); break;
                case "hf-non-utf8": c.Edits.Add(x => InsertBadUtf8(x, rng)); break;
                case "hf-model-type": Set(model, "type", Pick<Func<JsonNode?>>(rng, () => "BPE", () => "Unigram", () => "WordPiece", () => "Nope", () => null, () => 1)()); break;
                case "hf-vocab":
                    Set(model, "vocab", Pick<Func<JsonNode?>>(rng, () => new JsonArray(), () => "x", () => new JsonObject { ["[UNK]"] = 0, ["a"] = -1 },
                        () => new JsonObject { ["[UNK]"] = 0, ["a"] = 1e20 }, () => new JsonObject { ["[UNK]"] = 0, ["a"] = 0 }, () => new JsonObject { ["[UNK]"] = 0, ["a"] = 4294967295L },
                        () => new JsonObject(), () => new JsonObject { ["[UNK]"] = 5000 })());
                    break;
                case "hf-unk": Set(model, "unk_token", Pick<Func<JsonNode?>>(rng, () => "<missing>", () => null, () => 3, () => "")()); break;
                case "hf-deep":
                    {
                        int depth = NestDepth(rng);
                        c.Edits.Add(x => Insert(x, 1, Utf8($"\"deep\": {Nest(rng, depth, rng.NextDouble() < 0.7)},")));
                    }
                    break;
                case "hf-empty": c.Edits.Add(_ => Array.Empty<byte>()); break;
                case "hf-truncation":
                    // Options the tokenizers library panics on (stride ≥ max_length − specials, max_length 0) beside valid ones;
                    // a post-processor that adds specials moves the bound. The fuzz text is ~12 tokens: small max_lengths truncate.
                    if (rng.NextDouble() < 0.5)
                        c.Json["post_processor"] = new JsonObject
                        {
                            ["type"] = "TemplateProcessing",
                            ["single"] = new JsonArray(new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "[UNK]", ["type_id"] = 0 } }, new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } }),
                            ["pair"] = new JsonArray(new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } }, new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "B", ["type_id"] = 1 } }),
                            ["special_tokens"] = new JsonObject { ["[UNK]"] = new JsonObject { ["id"] = "[UNK]", ["ids"] = new JsonArray(0), ["tokens"] = new JsonArray("[UNK]") } },
                        };
                    c.Json["truncation"] = Pick<Func<JsonNode?>>(rng,
                        () => new JsonObject { ["direction"] = Pick(rng, "Right", "Left"), ["max_length"] = Pick<JsonNode?>(rng, 0, 1, 2, 3, 5, 512), ["strategy"] = Pick(rng, "LongestFirst", "OnlyFirst", "OnlySecond"), ["stride"] = Pick<JsonNode?>(rng, 0, 1, 2, 3, 5, 600) },
                        () => new JsonObject { ["max_length"] = Pick<JsonNode?>(rng, -1, 1e30, "8", null, 4294967296L), ["stride"] = Pick<JsonNode?>(rng, -3, "0", 1.5, null), ["strategy"] = Pick<JsonNode?>(rng, "Nope", 1, null) },
                        () => Pick<JsonNode?>(rng, "yes", 5, new JsonArray(), true))();
                    break;
                case "hf-padding":
                    c.Json["padding"] = Pick<Func<JsonNode?>>(rng,
                        () => new JsonObject
                        {
                            ["strategy"] = Pick<Func<JsonNode?>>(rng, () => "BatchLongest", () => new JsonObject { ["Fixed"] = Pick<JsonNode?>(rng, 0, 3, 64, 4294967295L, -1) }, () => "Longest", () => 3)(),
                            ["direction"] = Pick<JsonNode?>(rng, "Right", "Left", "Up"), ["pad_to_multiple_of"] = Pick<JsonNode?>(rng, null, 0, 1, 8, -8),
                            ["pad_id"] = Pick<JsonNode?>(rng, 0, 5, -1, 1e12), ["pad_type_id"] = 0, ["pad_token"] = Pick<JsonNode?>(rng, "[UNK]", "[PAD]", 7),
                        },
                        () => Pick<JsonNode?>(rng, "yes", 5, new JsonArray()))();
                    break;
            }
            File.WriteAllBytes(Path.Combine(dir, "tokenizer.json"), c.Bytes());
            return new Built(dir, null);
        }
        {
            var (vocab, merges) = TinyBpe();
            var vc = new CfgBuild(vocab);
            byte[] mergesBytes = Utf8(merges);
            switch (m)
            {
                case "bpe-valid": break;
                case "bpe-vocab-truncated": vc.Edits.Add(x => x[..rng.Next(x.Length)]); break;
                case "bpe-vocab-byte-flips": vc.Edits.Add(x => Flip(x, rng, 0, x.Length, rng.Next(1, 6))); break;
                case "bpe-vocab-wrong-type": vc.Edits.Add(_ => Utf8(Pick(rng, "[]", "null", "\"a\"", "{\"a\": \"1\"}", "{\"a\": 1.5}", "{\"a\": -1}", "{\"a\": null}"))); break;
                case "bpe-merges-bad":
                    mergesBytes = Utf8(Pick(rng, "#version: 0.2\nĠt\n", "#version: 0.2\nx y z\n", "#version: 0.2\nq q\n", "h e\n\n\nh e\n", "", "#version: 0.2\n\t \n", "#version: 0.2\n" + new string('a', 70000) + " b\n"));
                    break;
                case "bpe-merges-non-utf8": mergesBytes = InsertBadUtf8(mergesBytes, rng); break;
                case "bpe-missing-merges": File.WriteAllBytes(Path.Combine(dir, "vocab.json"), vc.Bytes()); return new Built(dir, null);   // vocab.json alone: no BPE pair
                case "bpe-bos-moved": Set(vocab, "</s>", Pick(rng, 7, 0, 300)); break;
                case "bpe-vocab-huge-id": Set(vocab, Pick(rng, "a", "Ġt", "</s>"), Pick<JsonNode>(rng, int.MaxValue, 1L << 40, 5000)); break;
            }
            File.WriteAllBytes(Path.Combine(dir, "vocab.json"), vc.Bytes());
            File.WriteAllBytes(Path.Combine(dir, "merges.txt"), mergesBytes);
            return new Built(dir, null);
        }
    }

    // ------------------------------------------------------------------ labels.tsv

    static readonly string[] LabelsMutations =
    {
        "labels-valid", "labels-bad-class", "labels-missing-image", "labels-missing-file", "labels-is-directory", "labels-non-utf8",
        "labels-tabs", "labels-traversal", "labels-empty", "labels-blank-lines", "labels-bom", "labels-crlf", "labels-nul",
        "labels-long-line", "labels-many-lines", "labels-truncated", "labels-image-is-directory", "labels-byte-flips",
    };

    static Built BuildLabels(CasePlan plan, Random rng, string dir)
    {
        _labelClasses = rng.NextDouble() < 0.5 ? 10 : null;
        string images = Path.Combine(dir, "images");
        Directory.CreateDirectory(images);
        var lines = new List<string>();
        for (int i = 0; i < 4; i++)
        {
            File.WriteAllBytes(Path.Combine(images, $"img{i}.png"), new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G' });   // existence is all Load checks
            lines.Add(rng.NextDouble() < 0.5 ? $"img{i}.png\t{i * 2}\tn0144{i}" : $"img{i}.png\t{i * 2}");
        }
        string labels = Path.Combine(dir, ImageSet.LabelsFile);
        int at = rng.Next(lines.Count);
        Func<byte[], byte[]>? edit = null;
        switch (plan.Mutation)
        {
            case "labels-valid": break;
            case "labels-bad-class":
                {
                    string c = Pick(rng, "-1", "1.5", "", "x", "0x1", "+3", "\u0661", " 7 ", "99999999999999999999", "2147483648", "9", "10", "1e3", "٣", "1,000");
                    Note($"class '{c}'");
                    lines[at] = $"img{at}.png\t{c}";
                }
                break;
            case "labels-missing-image": File.Delete(Path.Combine(images, $"img{at}.png")); break;
            case "labels-missing-file": lines = null!; break;
            case "labels-is-directory": lines = null!; Directory.CreateDirectory(labels); break;
            case "labels-non-utf8": edit = b => InsertBadUtf8(b, rng); break;
            case "labels-tabs": lines[at] = Pick(rng, $"img{at}.png", $"img{at}.png\t1\tn1\textra", "\t", "\t\t", $"\timg{at}.png\t1", $"img{at}.png\t\t1", $"img{at}.png 1"); break;
            case "labels-traversal": lines[at] = Pick(rng, "../x.png\t1", "/etc/passwd\t1", "images/../../x.png\t1", "..\\x.png\t1", "~/x.png\t1"); break;
            case "labels-empty": lines.Clear(); break;
            case "labels-blank-lines": lines = lines.SelectMany(l => new[] { l, "", "   ", "\t " }).ToList(); break;
            case "labels-bom": edit = b => Insert(b, 0, new byte[] { 0xEF, 0xBB, 0xBF }); break;
            case "labels-crlf": edit = b => Utf8(Encoding.UTF8.GetString(b).Replace("\n", "\r\n")); break;
            case "labels-nul": lines[at] = lines[at].Insert(rng.Next(lines[at].Length), "\0"); break;
            case "labels-long-line": lines[at] = new string('a', rng.Next(1000, 300_000)) + ".png\t1"; break;
            case "labels-many-lines": lines = Enumerable.Range(0, 20_000).Select(i => $"img{i % 4}.png\t{i % 10}").ToList(); break;
            case "labels-truncated": edit = b => b[..rng.Next(b.Length)]; break;
            case "labels-image-is-directory": File.Delete(Path.Combine(images, $"img{at}.png")); Directory.CreateDirectory(Path.Combine(images, $"img{at}.png")); break;
            case "labels-byte-flips": edit = b => Flip(b, rng, 0, b.Length, rng.Next(1, 6)); break;
            default: throw new InvalidOperationException($"unknown labels mutation {plan.Mutation}");
        }
        if (lines != null)
        {
            byte[] b = Utf8(string.Join("\n", lines) + (lines.Count > 0 ? "\n" : ""));
            if (edit != null && b.Length > 0) b = edit(b);
            File.WriteAllBytes(labels, b);
        }
        return new Built(dir, null);
    }
}
