using LlmSnp.Export;

namespace LlmSnp.Models;

/// <summary>
/// Llama / Mistral / Qwen2 checkpoints (dense or pruned) as llama.cpp's architecture <c>llama</c> when every layer
/// has the same widths, <c>deci</c> (whose loader reads per-layer head and FFN counts) when they differ.
/// </summary>
public sealed class LlamaGguf : IGgufExporter
{
    public GgufPlan Plan(GgufSource src)
    {
        var cfg = src.Config;
        var c = LlamaConfig.From(cfg);
        if (!src.HeadTied(c.TieWordEmbeddings)) c.Untie();
        if (cfg.Has("rope_scaling"))
            throw cfg.Unsupported("rope_scaling", "is set; only plain RoPE (rope_scaling null) is exported");
        if (c.Pruned && !cfg.Has("head_dim"))
            throw cfg.Missing("head_dim", "an integer (a pruned checkpoint's head size cannot be derived from hidden_size / num_attention_heads)");
        if (c.SlidingWindow is int window && window < c.MaxPositions)
            throw cfg.Unsupported("sliding_window", $"is {window} < max_position_embeddings {c.MaxPositions}; llama.cpp's llama architecture has no sliding-window attention");
        // A uniform list must agree with the stock field: the llama architecture reads only the stock one.
        Uniform(cfg, "intermediate_sizes", "intermediate_size", c.IntermediateSizes, c.Intermediate);
        Uniform(cfg, "num_heads_per_layer", "num_attention_heads", c.HeadsPerLayer, c.Heads);
        Uniform(cfg, "num_key_value_heads_per_layer", "num_key_value_heads", c.KvHeadsPerLayer, c.KvHeads);

        var ckpt = src.Checkpoint;
        bool qkvBias = c.QkvBias;
        var skipped = new List<string>();
        // llama.cpp's llama and deci loaders read attn_q.bias at n_embd entries, whatever the layer's head count.
        // Zero q/k/v biases (what a pruned Llama carries beside a reconstructed o_proj bias, for the stock
        // attention_bias flag) compute nothing and are left out; any other q bias in a narrowed layer is refused.
        var narrowed = Enumerable.Range(0, c.Layers).Where(i => c.HeadsPerLayer[i] * c.HeadDim != c.Hidden).ToArray();
        if (qkvBias && narrowed.Length > 0)
        {
            var qkv = Enumerable.Range(0, c.Layers).SelectMany(i => new[] { "q_proj", "k_proj", "v_proj" }.Select(n => $"model.layers.{i}.self_attn.{n}.bias")).ToArray();
            if (!qkv.All(n => ckpt.Has(n) && GgufExport.IsZero(ckpt, n)))
            {
                int i = narrowed[0];
                throw new LlmSnpException($"{cfg.Path}: layer {i}: q_proj.bias has {c.HeadsPerLayer[i]} heads × {c.HeadDim} = {c.HeadsPerLayer[i] * c.HeadDim} entries; llama.cpp's llama/deci loaders read attn_q.bias as hidden_size = {c.Hidden} entries, so a q bias needs all heads kept");
            }
            qkvBias = false;
            skipped.AddRange(qkv);
        }
        bool uniform = c.IntermediateSizes.All(f => f == c.IntermediateSizes[0]) && c.HeadsPerLayer.All(h => h == c.HeadsPerLayer[0]) && c.KvHeadsPerLayer.All(k => k == c.KvHeadsPerLayer[0]);
        string arch = uniform ? "llama" : "deci";
        var vocab = GgufVocabulary.Of(src.ModelDir, cfg, c.VocabSize);

        var tensors = new List<GgufTensor>();
        int H = c.Hidden, D = c.HeadDim;
        void Add(string hf, string gguf, long[] shape, string why, int ropeHeads = 0) => tensors.Add(new GgufTensor(hf, gguf, shape, why, ropeHeads));
        Add("model.embed_tokens.weight", "token_embd.weight", [c.VocabSize, H], "vocab_size × hidden_size");
        for (int i = 0; i < c.Layers; i++)
        {
            string p = $"model.layers.{i}.";
            int q = c.HeadsPerLayer[i] * D, kv = c.KvHeadsPerLayer[i] * D, f = c.IntermediateSizes[i];
            string heads = $"layer {i}: {c.HeadsPerLayer[i]} heads × head_dim {D}", kvs = $"layer {i}: {c.KvHeadsPerLayer[i]} kv heads × head_dim {D}", ffn = $"layer {i}: intermediate size {f}";
            Add(p + "input_layernorm.weight", $"blk.{i}.attn_norm.weight", [H], "hidden_size");
            // llama.cpp's llama/deci graphs rotate interleaved pairs; HF rotates halves: q/k rows go back per head.
            Add(p + "self_attn.q_proj.weight", $"blk.{i}.attn_q.weight", [q, H], heads, c.HeadsPerLayer[i]);
            Add(p + "self_attn.k_proj.weight", $"blk.{i}.attn_k.weight", [kv, H], kvs, c.KvHeadsPerLayer[i]);
            Add(p + "self_attn.v_proj.weight", $"blk.{i}.attn_v.weight", [kv, H], kvs);
            Add(p + "self_attn.o_proj.weight", $"blk.{i}.attn_output.weight", [H, q], heads);
            if (qkvBias)
            {
                Add(p + "self_attn.q_proj.bias", $"blk.{i}.attn_q.bias", [q], heads, c.HeadsPerLayer[i]);
                Add(p + "self_attn.k_proj.bias", $"blk.{i}.attn_k.bias", [kv], kvs, c.KvHeadsPerLayer[i]);
                Add(p + "self_attn.v_proj.bias", $"blk.{i}.attn_v.bias", [kv], kvs);
            }
            if (c.OBias) Add(p + "self_attn.o_proj.bias", $"blk.{i}.attn_output.bias", [H], "hidden_size");
            Add(p + "post_attention_layernorm.weight", $"blk.{i}.ffn_norm.weight", [H], "hidden_size");
            Add(p + "mlp.gate_proj.weight", $"blk.{i}.ffn_gate.weight", [f, H], ffn);
            Add(p + "mlp.up_proj.weight", $"blk.{i}.ffn_up.weight", [f, H], ffn);
            Add(p + "mlp.down_proj.weight", $"blk.{i}.ffn_down.weight", [H, f], ffn);
            if (c.MlpBias)
            {
                Add(p + "mlp.gate_proj.bias", $"blk.{i}.ffn_gate.bias", [f], ffn);
                Add(p + "mlp.up_proj.bias", $"blk.{i}.ffn_up.bias", [f], ffn);
                Add(p + "mlp.down_proj.bias", $"blk.{i}.ffn_down.bias", [H], "hidden_size");
            }
        }
        Add("model.norm.weight", "output_norm.weight", [H], "hidden_size");
        if (!c.TieWordEmbeddings) Add("lm_head.weight", "output.weight", [c.VocabSize, H], "vocab_size × hidden_size (tie_word_embeddings false)");
        // A tied checkpoint may still store lm_head; transformers replaces it with the embedding, and so does llama.cpp.
        else if (ckpt.Has("lm_head.weight")) skipped.Add("lm_head.weight");
        // A recomputed buffer older exports saved.
        skipped.AddRange(ckpt.Names.Where(n => n.EndsWith(".self_attn.rotary_emb.inv_freq", StringComparison.Ordinal)));

        var biases = new SortedSet<string>(StringComparer.Ordinal);
        if (qkvBias) biases.UnionWith(["q_proj", "k_proj", "v_proj"]);
        if (c.OBias) biases.Add("o_proj");
        if (c.MlpBias) biases.UnionWith(["gate_proj", "up_proj", "down_proj"]);

        return new GgufPlan
        {
            Architecture = arch, Vocab = c.VocabSize, Hidden = H, HeadDim = D, Tied = c.TieWordEmbeddings,
            Layers = Enumerable.Range(0, c.Layers).Select(i => new GgufLayerWidths(i, c.HeadsPerLayer[i], c.KvHeadsPerLayer[i], c.IntermediateSizes[i])).ToList(),
            Biases = biases.ToList(),
            Tensors = tensors, Skipped = skipped,
            Metadata = w => { WriteHyperParameters(w, c, arch, uniform); vocab.Write(w); },
            Unplaced = name => name.EndsWith(".bias", StringComparison.Ordinal)
                ? "is a bias config.json does not declare (attention_bias / mlp_bias)"
                : $"has no place in a {c.ModelType} GGUF (llama.cpp would not compute it)",
        };
    }

    /// <summary>
    /// A per-layer list that is the same for every layer must equal the stock field (LlmSnp's format writes both,
    /// and the llama architecture reads only the stock one).
    /// </summary>
    static void Uniform(ConfigFile cfg, string listField, string stockField, int[] perLayer, int stock)
    {
        if (!cfg.Has(listField) || perLayer.Any(x => x != perLayer[0]) || perLayer[0] == stock) return;
        throw cfg.Unsupported(stockField, $"is {stock} but every entry of '{listField}' is {perLayer[0]} (a uniformly pruned checkpoint stores the pruned value in both)");
    }

    static void WriteHyperParameters(GgufWriter w, LlamaConfig c, string a, bool uniform)
    {
        w.AddUInt32($"{a}.vocab_size", (uint)c.VocabSize);
        w.AddUInt32($"{a}.context_length", (uint)c.MaxPositions);
        w.AddUInt32($"{a}.embedding_length", (uint)c.Hidden);
        w.AddUInt32($"{a}.block_count", (uint)c.Layers);
        if (uniform)
        {
            w.AddUInt32($"{a}.feed_forward_length", (uint)c.IntermediateSizes[0]);
            w.AddUInt32($"{a}.attention.head_count", (uint)c.HeadsPerLayer[0]);
            w.AddUInt32($"{a}.attention.head_count_kv", (uint)c.KvHeadsPerLayer[0]);
        }
        else
        {
            // deci's loader reads these three per layer (int32 arrays of block_count entries).
            w.AddInt32Array($"{a}.feed_forward_length", c.IntermediateSizes);
            w.AddInt32Array($"{a}.attention.head_count", c.HeadsPerLayer);
            w.AddInt32Array($"{a}.attention.head_count_kv", c.KvHeadsPerLayer);
        }
        // Explicit: llama.cpp would otherwise take embedding_length / head_count, wrong once heads are pruned.
        w.AddUInt32($"{a}.attention.key_length", (uint)c.HeadDim);
        w.AddUInt32($"{a}.attention.value_length", (uint)c.HeadDim);
        w.AddUInt32($"{a}.rope.dimension_count", (uint)c.HeadDim);
        w.AddFloat32($"{a}.rope.freq_base", (float)c.RopeTheta);
        w.AddFloat32($"{a}.attention.layer_norm_rms_epsilon", (float)c.RmsNormEps);
    }
}
