using LlmSnp.Export;

namespace LlmSnp.Models;

/// <summary>
/// Gemma 2 / Gemma 3 (text) checkpoints as llama.cpp's architectures <c>gemma2</c> / <c>gemma3</c>. Their loaders size
/// every layer from one head count and one FFN width (per-layer widths are refused); the norms are written as 1 + w
/// (llama.cpp multiplies by the stored weight); RoPE is HF's rotate-half form (NEOX), so q/k rows keep their order.
/// What llama.cpp computes its own way — the attention scale, which layers slide, the local RoPE base — must agree
/// with the config, or the export is refused. The vocabulary is the SentencePiece tokenizer.model.
/// </summary>
public sealed class GemmaGguf : IGgufExporter
{
    public GgufPlan Plan(GgufSource src)
    {
        var cfg = src.Config;
        var c = GemmaConfig.From(cfg);
        if (!src.HeadTied(c.TieWordEmbeddings)) c.Untie();
        string a = c.Gemma3 ? "gemma3" : "gemma2";
        if (!c.Widths.Uniform)
            throw cfg.Unsupported("intermediate_sizes", $"(or num_heads_per_layer) differs across layers; llama.cpp's {a} reads one head count and one FFN width for every layer: prune with --uniform for GGUF");
        if (c.Activation != "gelu_pytorch_tanh") throw cfg.Unsupported("hidden_activation", $"is '{c.Activation}'; llama.cpp's {a} computes gelu with the tanh approximation");
        if (c.Rope.Type is not ("default" or "linear"))
            throw cfg.Unsupported("rope_scaling", $"type '{c.Rope.Type}' is not exported (llama.cpp's {a} takes linear scaling or none)");
        // llama.cpp scales scores by head_dim^-1/2, or (hidden / heads)^-1/2 for the 27B sizes it recognises by their
        // layer count (Gemma 2: 46, Gemma 3: 62); it reads no query_pre_attn_scalar.
        bool big = c.Layers == (c.Gemma3 ? 62 : 46);
        double scalar = big ? (double)c.Hidden / c.Widths.Heads[0] : c.HeadDim;
        if (Math.Abs(c.QueryPreAttnScalar - scalar) > 1e-9 * scalar)
            throw cfg.Unsupported("query_pre_attn_scalar", $"is {c.QueryPreAttnScalar}; llama.cpp's {a} scales attention by {(big ? $"hidden_size / heads = {scalar}" : $"head_dim = {scalar}")}^-1/2" +
                (big ? " (a 27B with heads removed cannot be exported)" : ""));
        if (!c.TieWordEmbeddings && !c.Gemma3) throw cfg.Unsupported("tie_word_embeddings", "is false; llama.cpp's gemma2 always uses the token embedding as its output");
        if (c.Gemma3 && (c.AttnSoftcap is not null || c.FinalSoftcap is not null))
            throw cfg.Unsupported(c.AttnSoftcap is not null ? "attn_logit_softcapping" : "final_logit_softcapping", "is set; llama.cpp's gemma3 soft-caps nothing");
        int pattern = SlidingPattern(c, cfg);
        var ckpt = src.Checkpoint;
        var skipped = new List<string>();
        if (c.AttentionBias)
        {
            var biases = Enumerable.Range(0, c.Layers).SelectMany(i => new[] { "q_proj", "k_proj", "v_proj", "o_proj" }.Select(n => $"model.layers.{i}.self_attn.{n}.bias")).ToArray();
            if (biases.FirstOrDefault(n => !GgufExport.IsZero(ckpt, n)) is string nonzero)
                throw new LlmSnpException($"{src.ModelDir}: tensor '{nonzero}' is not zero; llama.cpp's {a} has no attention biases (prune with --reconstruct lstsq-nobias for a GGUF)");
            skipped.AddRange(biases);
        }
        var vocab = GgufVocabulary.Of(src.ModelDir, cfg, c.VocabSize);

        int H = c.Hidden, D = c.HeadDim, q = c.Widths.Heads[0] * D, kv = c.Widths.KvHeads[0] * D, f = c.Widths.Intermediate[0];
        var tensors = new List<GgufTensor>();
        void Add(string source, string name, long[] shape, string why, float offset = 0) => tensors.Add(new GgufTensor(source, name, shape, why, Offset: offset));
        void Norm(string source, string name, long size, string why) => Add(source, name, [size], why, 1);   // (1 + w)
        Add("model.embed_tokens.weight", "token_embd.weight", [c.VocabSize, H], "vocab_size × hidden_size");
        for (int i = 0; i < c.Layers; i++)
        {
            string p = $"model.layers.{i}.", heads = $"{c.Widths.Heads[i]} heads × head_dim {D}", kvs = $"{c.Widths.KvHeads[i]} kv heads × head_dim {D}";
            Norm(p + "input_layernorm.weight", $"blk.{i}.attn_norm.weight", H, "hidden_size");
            Add(p + "self_attn.q_proj.weight", $"blk.{i}.attn_q.weight", [q, H], heads);
            Add(p + "self_attn.k_proj.weight", $"blk.{i}.attn_k.weight", [kv, H], kvs);
            Add(p + "self_attn.v_proj.weight", $"blk.{i}.attn_v.weight", [kv, H], kvs);
            if (c.Gemma3)
            {
                Norm(p + "self_attn.q_norm.weight", $"blk.{i}.attn_q_norm.weight", D, "head_dim");
                Norm(p + "self_attn.k_norm.weight", $"blk.{i}.attn_k_norm.weight", D, "head_dim");
            }
            Add(p + "self_attn.o_proj.weight", $"blk.{i}.attn_output.weight", [H, q], heads);
            Norm(p + "post_attention_layernorm.weight", $"blk.{i}.post_attention_norm.weight", H, "hidden_size");
            Norm(p + "pre_feedforward_layernorm.weight", $"blk.{i}.ffn_norm.weight", H, "hidden_size");
            Add(p + "mlp.gate_proj.weight", $"blk.{i}.ffn_gate.weight", [f, H], $"intermediate size {f}");
            Add(p + "mlp.up_proj.weight", $"blk.{i}.ffn_up.weight", [f, H], $"intermediate size {f}");
            Add(p + "mlp.down_proj.weight", $"blk.{i}.ffn_down.weight", [H, f], $"intermediate size {f}");
            Norm(p + "post_feedforward_layernorm.weight", $"blk.{i}.post_ffw_norm.weight", H, "hidden_size");
        }
        Norm("model.norm.weight", "output_norm.weight", H, "hidden_size");
        if (!c.TieWordEmbeddings) Add("lm_head.weight", "output.weight", [c.VocabSize, H], "vocab_size × hidden_size (tie_word_embeddings false)");
        else if (ckpt.Has("lm_head.weight")) skipped.Add("lm_head.weight");

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
                w.AddUInt32($"{a}.attention.key_length", (uint)D);
                w.AddUInt32($"{a}.attention.value_length", (uint)D);
                w.AddFloat32($"{a}.attention.layer_norm_rms_epsilon", (float)c.RmsNormEps);
                // No window (null): one as long as the context, which llama.cpp's sliding layers then never reach.
                w.AddUInt32($"{a}.attention.sliding_window", (uint)(c.SlidingWindow ?? c.MaxPositions));
                w.AddFloat32($"{a}.rope.freq_base", (float)c.RopeTheta);
                if (c.Gemma3)
                {
                    // Read by llama.cpp's gemma3 (defaults 6 and 10000); gemma2's pattern is fixed at 2, its bases one.
                    w.AddUInt32($"{a}.attention.sliding_window_pattern", (uint)pattern);
                    w.AddFloat32($"{a}.rope.freq_base_swa", (float)c.RopeLocalTheta);
                }
                if (c.Rope.Type == "linear")
                {
                    w.AddString($"{a}.rope.scaling.type", "linear");
                    w.AddFloat32($"{a}.rope.scaling.factor", (float)c.Rope.Factor);
                }
                if (c.AttnSoftcap is double ac) w.AddFloat32($"{a}.attn_logit_softcapping", (float)ac);
                if (c.FinalSoftcap is double fc) w.AddFloat32($"{a}.final_logit_softcapping", (float)fc);
                vocab.Write(w);
            },
            Unplaced = name => $"has no place in a {a} GGUF (llama.cpp would not compute it)",
        };
    }

    /// <summary>
    /// The period n with which llama.cpp marks layers sliding (layer i slides unless (i + 1) is a multiple of n, HF's
    /// default rule): Gemma 2's is fixed at 2; Gemma 3's is read from the file, and at least one layer must slide (its
    /// loader asserts so). A config whose layer_types follow no period is refused.
    /// </summary>
    static int SlidingPattern(GemmaConfig c, ConfigFile cfg)
    {
        bool Fits(int n) => Enumerable.Range(0, c.Layers).All(i => c.Sliding[i] == ((i + 1) % n != 0));
        if (!c.Gemma3)
            return Fits(2) ? 2 : throw cfg.Unsupported("layer_types", "makes other layers sliding than the even ones; llama.cpp's gemma2 slides layers 0, 2, 4, …");
        string field = cfg.Has("layer_types") ? "layer_types" : "sliding_window_pattern";
        if (!c.Sliding.Contains(true)) throw cfg.Unsupported(field, "leaves no layer sliding; llama.cpp's gemma3 needs one at least");
        for (int n = 2; n <= c.Layers + 1; n++) if (Fits(n)) return n;
        throw cfg.Unsupported(field, "does not follow a period (layer i slides unless i + 1 is a multiple of n), the only form llama.cpp's gemma3 reads");
    }
}
