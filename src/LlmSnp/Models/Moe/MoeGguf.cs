using LlmSnp.Export;

namespace LlmSnp.Models;

/// <summary>
/// A sparse-MoE checkpoint as one of llama.cpp's mixture architectures (docs/models.md "GGUF of mixtures"): the
/// experts' per-expert tensors stacked into 3-D `ffn_{gate,up,down}_exps` [experts, rows, cols], the router as
/// `ffn_gate_inp`, and the expert count written as pruned. llama.cpp reads one head count, one expert count, one
/// expert width and renormalises the top-k weights: anything else is refused while planning.
/// </summary>
public abstract class MoeGguf : IGgufExporter
{
    /// <summary>llama.cpp's architecture name.</summary>
    protected abstract string Architecture { get; }

    /// <summary>Whether the graph rotates interleaved pairs (llama: q/k rows go back from HF's halves) or halves (NEOX: as stored).</summary>
    protected abstract bool InterleavedRope { get; }

    protected abstract MoeConfig Parse(ConfigFile cfg);

    /// <summary>What llama.cpp's graph for this architecture does not compute as the checkpoint does (null: nothing).</summary>
    protected virtual string? Unsupported(MoeConfig c) => null;

    /// <summary>Architecture keys beyond the common ones.</summary>
    protected virtual void ExtraMetadata(GgufWriter w, MoeConfig c) { }

    public GgufPlan Plan(GgufSource src)
    {
        var cfg = src.Config;
        var c = Parse(cfg);
        if (!src.HeadTied(c.TieWordEmbeddings)) c.Untie();
        string a = Architecture;
        if (cfg.Has("rope_scaling")) throw cfg.Unsupported("rope_scaling", "is set; only plain RoPE (rope_scaling null) is exported");
        if (c.Pruned && !cfg.Has("head_dim"))
            throw cfg.Missing("head_dim", "an integer (a pruned checkpoint's head size cannot be derived from hidden_size / num_attention_heads)");
        if (c.SlidingWindow is int window && window < c.MaxPositions)
            throw cfg.Unsupported("sliding_window", $"is {window} < max_position_embeddings {c.MaxPositions}; llama.cpp's {a} architecture has no sliding-window attention");
        if (c.HeadsPerLayer.Distinct().Count() > 1 || c.KvHeadsPerLayer.Distinct().Count() > 1)
            throw cfg.Unsupported("num_heads_per_layer", $"differs across layers; llama.cpp's {a} architecture reads one head count (prune with --uniform)");
        if (c.HeadsPerLayer[0] != c.Heads || c.KvHeadsPerLayer[0] != c.KvHeads)
            throw cfg.Unsupported("num_attention_heads", $"is {c.Heads} but every layer has {c.HeadsPerLayer[0]} heads (a uniformly pruned checkpoint stores the pruned value in both)");
        if (c.Sparse.Any(s => !s))
            throw cfg.Unsupported("mlp_only_layers", $"makes layer {Array.IndexOf(c.Sparse, false)} dense; llama.cpp's {a} architecture has experts in every layer");
        var widths = c.ExpertWidths.SelectMany(w => w).Distinct().ToArray();
        if (widths.Length != 1)
            throw cfg.Unsupported("expert_intermediate_sizes", $"holds {widths.Length} different expert widths; llama.cpp stacks a layer's experts into one tensor and reads one width (prune with --uniform)");
        if (!c.NormTopK) throw cfg.Unsupported("norm_topk_prob", $"is false; llama.cpp's {a} graph always renormalises the chosen experts' weights");
        if (c.AttentionBias) throw cfg.Unsupported("attention_bias", $"is true; llama.cpp's {a} architecture reads no attention biases");
        if (Unsupported(c) is string why) throw new LlmSnpException($"{cfg.Path}: {why}");
        var vocab = GgufVocabulary.Of(src.ModelDir, cfg, c.VocabSize);

        var tensors = new List<GgufTensor>();
        int H = c.Hidden, D = c.HeadDim, E = c.Experts, F = widths[0];
        int q = c.Heads * D, kv = c.KvHeads * D;
        var n = c.Names;
        void Add(string hf, string gguf, long[] shape, string why, int ropeHeads = 0) => tensors.Add(new GgufTensor(hf, gguf, shape, why, InterleavedRope ? ropeHeads : 0));
        void Stack(string p, string linear, string gguf, long[] each, string why)
        {
            var names = Enumerable.Range(0, E).Select(e => $"{p}{n.Experts}.{e}.{linear}.weight").ToArray();
            tensors.Add(new GgufTensor(names[0], gguf, new long[] { E }.Concat(each).ToArray(), why) { Stacked = names });
        }
        Add("model.embed_tokens.weight", "token_embd.weight", [c.VocabSize, H], "vocab_size × hidden_size");
        string heads = $"{c.Heads} heads × head_dim {D}", kvs = $"{c.KvHeads} kv heads × head_dim {D}", experts = $"{E} experts ({c.ExpertsField}) of width {F}";
        for (int i = 0; i < c.Layers; i++)
        {
            string p = $"model.layers.{i}.";
            Add(p + "input_layernorm.weight", $"blk.{i}.attn_norm.weight", [H], "hidden_size");
            Add(p + "self_attn.q_proj.weight", $"blk.{i}.attn_q.weight", [q, H], heads, c.Heads);
            Add(p + "self_attn.k_proj.weight", $"blk.{i}.attn_k.weight", [kv, H], kvs, c.KvHeads);
            Add(p + "self_attn.v_proj.weight", $"blk.{i}.attn_v.weight", [kv, H], kvs);
            Add(p + "self_attn.o_proj.weight", $"blk.{i}.attn_output.weight", [H, q], heads);
            if (c.QkNorm)
            {
                Add(p + "self_attn.q_norm.weight", $"blk.{i}.attn_q_norm.weight", [D], "head_dim");
                Add(p + "self_attn.k_norm.weight", $"blk.{i}.attn_k_norm.weight", [D], "head_dim");
            }
            Add(p + "post_attention_layernorm.weight", $"blk.{i}.ffn_norm.weight", [H], "hidden_size");
            Add(p + n.Router + ".weight", $"blk.{i}.ffn_gate_inp.weight", [E, H], experts);
            Stack(p, n.Gate, $"blk.{i}.ffn_gate_exps.weight", [F, H], experts);
            Stack(p, n.Up, $"blk.{i}.ffn_up_exps.weight", [F, H], experts);
            Stack(p, n.Down, $"blk.{i}.ffn_down_exps.weight", [H, F], experts);
        }
        Add("model.norm.weight", "output_norm.weight", [H], "hidden_size");
        var skipped = new List<string>();
        if (!c.TieWordEmbeddings) Add("lm_head.weight", "output.weight", [c.VocabSize, H], "vocab_size × hidden_size (tie_word_embeddings false)");
        else if (src.Checkpoint.Has("lm_head.weight")) skipped.Add("lm_head.weight");

        return new GgufPlan
        {
            Architecture = a, Vocab = c.VocabSize, Hidden = H, HeadDim = D, Tied = c.TieWordEmbeddings,
            Layers = Enumerable.Range(0, c.Layers).Select(i => new GgufLayerWidths(i, c.Heads, c.KvHeads, F)).ToList(),
            Biases = Array.Empty<string>(),
            Tensors = tensors, Skipped = skipped,
            Metadata = w =>
            {
                w.AddUInt32($"{a}.vocab_size", (uint)c.VocabSize);
                w.AddUInt32($"{a}.context_length", (uint)c.MaxPositions);
                w.AddUInt32($"{a}.embedding_length", (uint)H);
                w.AddUInt32($"{a}.block_count", (uint)c.Layers);
                w.AddUInt32($"{a}.attention.head_count", (uint)c.Heads);
                w.AddUInt32($"{a}.attention.head_count_kv", (uint)c.KvHeads);
                // Explicit: llama.cpp would otherwise take embedding_length / head_count (wrong for Qwen3's head_dim, or once heads are pruned).
                w.AddUInt32($"{a}.attention.key_length", (uint)D);
                w.AddUInt32($"{a}.attention.value_length", (uint)D);
                w.AddUInt32($"{a}.rope.dimension_count", (uint)D);
                w.AddFloat32($"{a}.rope.freq_base", (float)c.RopeTheta);
                w.AddFloat32($"{a}.attention.layer_norm_rms_epsilon", (float)c.RmsNormEps);
                w.AddUInt32($"{a}.expert_count", (uint)E);
                w.AddUInt32($"{a}.expert_used_count", (uint)c.TopK);
                ExtraMetadata(w, c);
                vocab.Write(w);
            },
            Unplaced = name => $"has no place in a {c.ModelType} GGUF (llama.cpp would not compute it)",
        };
    }
}
