using LlmSnp.Export;

namespace LlmSnp.Models;

/// <summary>
/// Qwen3 checkpoints as llama.cpp's architecture <c>qwen3</c>: its loader sizes every layer from one head count and
/// one FFN width (per-layer widths are refused), loads no attention biases and has no sliding window; its RoPE is
/// HF's rotate-half form (NEOX), so q/k rows keep their order. The vocabulary is the byte-level BPE of tokenizer.json.
/// </summary>
public sealed class Qwen3Gguf : IGgufExporter
{
    public GgufPlan Plan(GgufSource src)
    {
        var cfg = src.Config;
        var c = Qwen3Config.From(cfg);
        if (!src.HeadTied(c.TieWordEmbeddings)) c.Untie();
        if (c.Rope.Type is not ("default" or "linear"))
            throw cfg.Unsupported("rope_scaling", $"type '{c.Rope.Type}' is not exported (llama.cpp's qwen3 takes linear scaling or none)");
        if (Enumerable.Range(0, c.Layers).FirstOrDefault(i => c.Windows[i] is int w && w < c.MaxPositions, -1) is int swa && swa >= 0)
            throw cfg.Unsupported("use_sliding_window", $"gives layer {swa} a sliding window of {c.Windows[swa]} < max_position_embeddings {c.MaxPositions}; llama.cpp's qwen3 has no sliding-window attention");
        if (!c.Widths.Uniform)
            throw cfg.Unsupported("intermediate_sizes", "(or num_heads_per_layer) differs across layers; llama.cpp's qwen3 reads one head count and one FFN width for every layer: prune with --uniform for GGUF");
        var ckpt = src.Checkpoint;
        var skipped = new List<string>();
        if (c.AttentionBias)
        {
            // What a mean-term reconstruction leaves: zero q/k/v biases (for the stock flag) and a reconstructed o_proj bias.
            var biases = Enumerable.Range(0, c.Layers).SelectMany(i => new[] { "q_proj", "k_proj", "v_proj", "o_proj" }.Select(n => $"model.layers.{i}.self_attn.{n}.bias")).ToArray();
            if (biases.FirstOrDefault(n => !GgufExport.IsZero(ckpt, n)) is string nonzero)
                throw new LlmSnpException($"{src.ModelDir}: tensor '{nonzero}' is not zero; llama.cpp's qwen3 has no attention biases (prune with --reconstruct lstsq-nobias for a GGUF)");
            skipped.AddRange(biases);
        }
        var vocab = GgufVocabulary.Of(src.ModelDir, cfg, c.VocabSize);

        int H = c.Hidden, D = c.HeadDim, q = c.Widths.Heads[0] * D, kv = c.Widths.KvHeads[0] * D, f = c.Widths.Intermediate[0];
        var tensors = new List<GgufTensor>();
        void Add(string source, string name, long[] shape, string why) => tensors.Add(new GgufTensor(source, name, shape, why));
        Add("model.embed_tokens.weight", "token_embd.weight", [c.VocabSize, H], "vocab_size × hidden_size");
        for (int i = 0; i < c.Layers; i++)
        {
            string p = $"model.layers.{i}.", heads = $"{c.Widths.Heads[i]} heads × head_dim {D}", kvs = $"{c.Widths.KvHeads[i]} kv heads × head_dim {D}";
            Add(p + "input_layernorm.weight", $"blk.{i}.attn_norm.weight", [H], "hidden_size");
            Add(p + "self_attn.q_proj.weight", $"blk.{i}.attn_q.weight", [q, H], heads);
            Add(p + "self_attn.k_proj.weight", $"blk.{i}.attn_k.weight", [kv, H], kvs);
            Add(p + "self_attn.v_proj.weight", $"blk.{i}.attn_v.weight", [kv, H], kvs);
            Add(p + "self_attn.o_proj.weight", $"blk.{i}.attn_output.weight", [H, q], heads);
            Add(p + "self_attn.q_norm.weight", $"blk.{i}.attn_q_norm.weight", [D], "head_dim");
            Add(p + "self_attn.k_norm.weight", $"blk.{i}.attn_k_norm.weight", [D], "head_dim");
            Add(p + "post_attention_layernorm.weight", $"blk.{i}.ffn_norm.weight", [H], "hidden_size");
            Add(p + "mlp.gate_proj.weight", $"blk.{i}.ffn_gate.weight", [f, H], $"intermediate size {f}");
            Add(p + "mlp.up_proj.weight", $"blk.{i}.ffn_up.weight", [f, H], $"intermediate size {f}");
            Add(p + "mlp.down_proj.weight", $"blk.{i}.ffn_down.weight", [H, f], $"intermediate size {f}");
        }
        Add("model.norm.weight", "output_norm.weight", [H], "hidden_size");
        if (!c.TieWordEmbeddings) Add("lm_head.weight", "output.weight", [c.VocabSize, H], "vocab_size × hidden_size (tie_word_embeddings false)");
        else if (ckpt.Has("lm_head.weight")) skipped.Add("lm_head.weight");   // a tied head stored anyway: llama.cpp reuses token_embd

        return new GgufPlan
        {
            Architecture = "qwen3", Vocab = c.VocabSize, Hidden = H, HeadDim = D, Tied = c.TieWordEmbeddings,
            Layers = Enumerable.Range(0, c.Layers).Select(i => new GgufLayerWidths(i, c.Widths.Heads[i], c.Widths.KvHeads[i], c.Widths.Intermediate[i])).ToList(),
            Biases = Array.Empty<string>(),
            Tensors = tensors, Skipped = skipped,
            Metadata = w =>
            {
                const string a = "qwen3";
                w.AddUInt32($"{a}.vocab_size", (uint)c.VocabSize);
                w.AddUInt32($"{a}.context_length", (uint)c.MaxPositions);
                w.AddUInt32($"{a}.embedding_length", (uint)H);
                w.AddUInt32($"{a}.block_count", (uint)c.Layers);
                w.AddUInt32($"{a}.feed_forward_length", (uint)f);
                w.AddUInt32($"{a}.attention.head_count", (uint)c.Widths.Heads[0]);
                w.AddUInt32($"{a}.attention.head_count_kv", (uint)c.Widths.KvHeads[0]);
                // Explicit: llama.cpp would otherwise take embedding_length / head_count (Qwen3's head_dim is not that).
                w.AddUInt32($"{a}.attention.key_length", (uint)D);
                w.AddUInt32($"{a}.attention.value_length", (uint)D);
                w.AddUInt32($"{a}.rope.dimension_count", (uint)D);
                w.AddFloat32($"{a}.rope.freq_base", (float)c.RopeTheta);
                if (c.Rope.Type == "linear")
                {
                    w.AddString($"{a}.rope.scaling.type", "linear");
                    w.AddFloat32($"{a}.rope.scaling.factor", (float)c.Rope.Factor);
                }
                w.AddFloat32($"{a}.attention.layer_norm_rms_epsilon", (float)c.RmsNormEps);
                vocab.Write(w);
            },
            Unplaced = name => $"has no place in a qwen3 GGUF (llama.cpp would not compute it)",
        };
    }
}
