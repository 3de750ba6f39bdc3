using LlmSnp.Export;

namespace LlmSnp.Models;

/// <summary>
/// Phi-3 checkpoints as llama.cpp's architecture <c>phi3</c>. Its loader sizes `attn_qkv` as [n_embd + 2·n_embd_gqa]
/// rows and `attn_output` as n_embd × n_embd, so the query heads must span hidden_size (heads removed: refused), and it
/// reads one FFN width for every layer (`ffn_up` = the fused gate_up_proj, gate rows first as ggml's swiglu splits it).
/// The fused tensors are written as they are stored (RoPE is HF's rotate-half form, NEOX in ggml, so rows keep their
/// order); `rope.dimension_count` carries partial rotary. longrope: the short and long factors as `rope_factors_short` /
/// `rope_factors_long` and HF's attention factor as `rope.scaling.attn_factor`; llama.cpp picks the long factors when its
/// context per sequence exceeds `rope.scaling.original_context_length` (HF: when the sequence does). llama.cpp's phi3 has
/// its sliding window disabled (full attention): a window shorter than the context is refused.
/// </summary>
public sealed class Phi3Gguf : IGgufExporter
{
    public GgufPlan Plan(GgufSource src)
    {
        var cfg = src.Config;
        var c = Phi3Config.From(cfg);
        if (!src.HeadTied(c.TieWordEmbeddings)) c.Untie();
        const string a = "phi3";
        if (!c.Widths.Uniform)
            throw cfg.Unsupported("intermediate_sizes", "(or num_heads_per_layer) differs across layers; llama.cpp's phi3 reads one head count and one FFN width for every layer: prune with --uniform for GGUF");
        if (c.Widths.Heads[0] * c.HeadDim != c.Hidden)
            throw cfg.Unsupported("num_attention_heads", $"× head_dim is {c.Widths.Heads[0]} × {c.HeadDim} = {c.Widths.Heads[0] * c.HeadDim} ≠ hidden_size {c.Hidden}; llama.cpp's phi3 sizes attention by hidden_size (prune MLP neurons only, --targets mlp, for GGUF)");
        if (c.SlidingWindow is int w && w < c.MaxPositions)
            throw cfg.Unsupported("sliding_window", $"is {w} < max_position_embeddings {c.MaxPositions}; llama.cpp's phi3 attends to every position (its sliding window is disabled), so positions past the window would differ");
        var vocab = GgufVocabulary.Of(src.ModelDir, cfg, c.VocabSize);

        int H = c.Hidden, D = c.HeadDim, f = c.Widths.Intermediate[0];
        var (qkv, qkvWhy, gateUp, gateUpWhy) = c.Fused(0);
        var tensors = new List<GgufTensor>();
        var skipped = new List<string>();
        void Add(string source, string name, long[] shape, string why) => tensors.Add(new GgufTensor(source, name, shape, why));
        Add("model.embed_tokens.weight", "token_embd.weight", [c.VocabSize, H], "vocab_size × hidden_size");
        if (c.Rope.Type == "longrope")
        {
            int half = c.RotaryDim / 2;
            tensors.Add(new GgufTensor("rope_scaling.long_factor", "rope_factors_long.weight", [half], "rotary dims / 2") { Values = c.Rope.LongFactor!.Select(x => (float)x).ToArray() });
            tensors.Add(new GgufTensor("rope_scaling.short_factor", "rope_factors_short.weight", [half], "rotary dims / 2") { Values = c.Rope.ShortFactor!.Select(x => (float)x).ToArray() });
        }
        for (int i = 0; i < c.Layers; i++)
        {
            string p = $"model.layers.{i}.";
            Add(p + "input_layernorm.weight", $"blk.{i}.attn_norm.weight", [H], "hidden_size");
            Add(p + "self_attn.qkv_proj.weight", $"blk.{i}.attn_qkv.weight", [qkv.Sum(), H], qkvWhy);
            Add(p + "self_attn.o_proj.weight", $"blk.{i}.attn_output.weight", [H, qkv[0]], $"{c.Widths.Heads[i]} heads × head_dim {D}");
            Add(p + "post_attention_layernorm.weight", $"blk.{i}.ffn_norm.weight", [H], "hidden_size");
            Add(p + "mlp.gate_up_proj.weight", $"blk.{i}.ffn_up.weight", [gateUp.Sum(), H], gateUpWhy);
            Add(p + "mlp.down_proj.weight", $"blk.{i}.ffn_down.weight", [H, f], $"intermediate size {f}");
        }
        Add("model.norm.weight", "output_norm.weight", [H], "hidden_size");
        if (!c.TieWordEmbeddings) Add("lm_head.weight", "output.weight", [c.VocabSize, H], "vocab_size × hidden_size (tie_word_embeddings false)");
        else if (src.Checkpoint.Has("lm_head.weight")) skipped.Add("lm_head.weight");   // a tied head stored anyway: llama.cpp reuses token_embd

        return new GgufPlan
        {
            Architecture = a, Vocab = c.VocabSize, Hidden = H, HeadDim = D, Tied = c.TieWordEmbeddings,
            Layers = Enumerable.Range(0, c.Layers).Select(i => new GgufLayerWidths(i, c.Widths.Heads[i], c.Widths.KvHeads[i], c.Widths.Intermediate[i])).ToList(),
            Biases = Array.Empty<string>(),
            Tensors = tensors, Skipped = skipped,
            Metadata = w =>
            {
                w.AddUInt32($"{a}.vocab_size", (uint)c.VocabSize);
                w.AddUInt32($"{a}.context_length", (uint)c.MaxPositions);
                w.AddUInt32($"{a}.embedding_length", (uint)H);
                w.AddUInt32($"{a}.block_count", (uint)c.Layers);
                w.AddUInt32($"{a}.feed_forward_length", (uint)f);
                w.AddUInt32($"{a}.attention.head_count", (uint)c.Widths.Heads[0]);
                w.AddUInt32($"{a}.attention.head_count_kv", (uint)c.Widths.KvHeads[0]);
                w.AddUInt32($"{a}.rope.dimension_count", (uint)c.RotaryDim);
                w.AddFloat32($"{a}.rope.freq_base", (float)c.RopeTheta);
                w.AddFloat32($"{a}.attention.layer_norm_rms_epsilon", (float)c.RmsNormEps);
                // llama.cpp reads the window and, at this version, leaves it off; 0 where the config has none (as convert_hf_to_gguf).
                w.AddUInt32($"{a}.attention.sliding_window", (uint)(c.SlidingWindow ?? 0));
                if (c.Rope.Type == "longrope")
                {
                    w.AddUInt32($"{a}.rope.scaling.original_context_length", (uint)c.Rope.OriginalMaxPositions);
                    w.AddFloat32($"{a}.rope.scaling.attn_factor", (float)c.Rope.AttentionFactor);
                }
                vocab.Write(w);
            },
            Unplaced = name => $"has no place in a phi3 GGUF (llama.cpp would not compute it)",
        };
    }
}
