namespace LlmSnp.Models;

/// <summary>The fields of an OPT config.json that the forward depends on (models.md §2).</summary>
public sealed class OptConfig
{
    public required ConfigFile File { get; init; }
    public int VocabSize { get; init; }
    public int Hidden { get; init; }
    public int Layers { get; init; }
    public int Heads { get; init; }
    public int Ffn { get; init; }
    public int MaxPositions { get; init; }
    public bool PreLayerNorm { get; init; }
    public int WordEmbedProjDim { get; init; }
    public bool TieWordEmbeddings { get; private set; }

    /// <summary>
    /// The checkpoint stores a head distinct from the embedding under a tying config: it is used untied, as
    /// transformers loads it, and every config written from this one says so.
    /// </summary>
    public void Untie()
    {
        TieWordEmbeddings = false;
        File.Json["tie_word_embeddings"] = false;
    }
    public int HeadDim => Hidden / Heads;
    /// <summary>Per-layer widths: the config's lists for a pruned checkpoint, else uniform.</summary>
    public required int[] FfnDims { get; init; }
    public required int[] HeadsPerLayer { get; init; }
    public bool Pruned { get; init; }

    public static OptConfig From(ConfigFile f)
    {
        if (f.ModelType != "opt") throw new LlmSnpException($"{f.Path}: model_type '{f.ModelType}' is not OPT");
        int hidden = f.Int("hidden_size"), heads = f.Int("num_attention_heads"), layers = f.Layers();
        if (hidden % heads != 0) throw f.Unsupported("num_attention_heads", $"({heads}) does not divide hidden_size ({hidden})");
        string act = f.Has("activation_function") ? f.String("activation_function") : "relu";
        if (act != "relu") throw f.Unsupported("activation_function", $"is '{act}'; only relu is supported");
        if (!f.Bool("enable_bias", true)) throw f.Unsupported("enable_bias", "is false; OPT without biases is not supported");
        if (!f.Bool("layer_norm_elementwise_affine", true)) throw f.Unsupported("layer_norm_elementwise_affine", "is false; not supported");
        int ffn = f.Int("ffn_dim");
        return new OptConfig
        {
            File = f,
            VocabSize = f.Int("vocab_size"),
            Hidden = hidden,
            Layers = layers,
            Heads = heads,
            Ffn = ffn,
            MaxPositions = f.Int("max_position_embeddings", 2048),
            PreLayerNorm = f.Bool("do_layer_norm_before", true),
            WordEmbedProjDim = f.Int("word_embed_proj_dim", hidden),
            TieWordEmbeddings = f.Bool("tie_word_embeddings", true),
            FfnDims = f.IntList("ffn_dims", layers) ?? Enumerable.Repeat(ffn, layers).ToArray(),
            HeadsPerLayer = f.IntList("num_heads_per_layer", layers) ?? Enumerable.Repeat(heads, layers).ToArray(),
            Pruned = f.Bool("pruned", false),
        };
    }
}
