using LlmSnp.Checkpoint;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>What a decoder-only config says about the tensors around its layers.</summary>
public interface IDecoderConfig
{
    int VocabSize { get; }
    int Hidden { get; }
    int Layers { get; }
    int MaxPositions { get; }
    bool TieWordEmbeddings { get; }
    /// <summary>A tied config whose checkpoint stores a different head is untied, as transformers loads it.</summary>
    void Untie();
}

/// <summary>
/// What every rotary decoder-only LM in HF's `model.` layout shares around its layers: the token embedding (kept in its
/// stored dtype, rows converted as they are looked up), the final norm and the head (tied or not), resident while the
/// layers stream; the embedding lookup for plain and packed rows; the head; their tensors and parameter counts. A
/// family adds its config, its layers' tensors, its final norm and its blocks.
/// </summary>
public abstract class DecoderModel<TConfig> : StreamedModel where TConfig : IDecoderConfig
{
    public const string Prefix = "model.";
    public TConfig Config { get; }
    public int BlockCount => Config.Layers;
    public int MaxPositions => Config.MaxPositions;
    public int VocabSize => Config.VocabSize;

    Tensor _embedTokens = null!, _norm = null!;
    Tensor? _lmHead, _headCompute;

    protected DecoderModel(string modelDir, TConfig config, Device? device, ScalarType computeDType, params string[] companionFiles)
        : base(modelDir, device, computeDType, companionFiles)
    {
        Config = config;
    }

    /// <summary>Layer i's tensors (local names) and shapes for its widths, in HF module order.</summary>
    public abstract IEnumerable<(string Name, long[] Shape)> BlockTensors(int i);

    /// <summary>The final norm before the head (RMSNorm; Gemma's scales by 1 + w).</summary>
    protected abstract Tensor FinalNorm(Tensor h, Tensor weight);

    /// <summary>Embedding rows as the family feeds them to the first layer (Gemma multiplies by √hidden).</summary>
    protected virtual Tensor ScaleEmbeddings(Tensor rows) => rows;

    /// <summary>Logits as the family returns them (Gemma 2 soft-caps them).</summary>
    protected virtual Tensor CapLogits(Tensor logits) => logits;

    /// <summary>
    /// Checks every stored tensor against the config and reads the embedding, final norm and head; the family's
    /// constructor calls it first, inside its own try (a tied head may be stored under either name, or twice and then
    /// untied where the two differ).
    /// </summary>
    protected void OpenOuterTensors()
    {
        var c = Config;
        if (!Checkpoint.TieHead(Prefix + "embed_tokens.weight", "lm_head.weight", c.TieWordEmbeddings) && c.TieWordEmbeddings) c.Untie();
        StoredDType = SafeDTypes.ToTorch(Checkpoint.Entry(Prefix + "embed_tokens.weight").DType);
        UnusedTensors = CheckpointLayout.Check(Checkpoint, ModelDir, c.Layers, ExpectedTensors(), new[] { "lm_head.weight" });
        _embedTokens = Resident(ReadAs(Prefix + "embed_tokens.weight", StoredDType, c.VocabSize, c.Hidden));
        _norm = Resident(ReadAs(Prefix + "norm.weight", ComputeDType, c.Hidden));
        if (!c.TieWordEmbeddings) _lmHead = Resident(ReadAs("lm_head.weight", StoredDType, c.VocabSize, c.Hidden));
    }

    Tensor HeadWeight => _headCompute ??= Resident((_lmHead ?? _embedTokens).to(ComputeDType).DetachFromDisposeScope());

    public Tensor Embed(Tensor ids) => EmbedAt(ids, 0);

    /// <summary>Token embeddings carry no position (RoPE rotates inside attention): the start only bounds the sequence.</summary>
    public Tensor EmbedAt(Tensor ids, int startPosition)
    {
        CheckTokens(ids, startPosition, Config.MaxPositions, Config.VocabSize);
        return Lookup(ids);
    }

    /// <summary>Packed rows: the positions only bound each sequence (RoPE reads them in the blocks).</summary>
    public Tensor EmbedAt(Tensor ids, Tensor positions)
    {
        CheckPackedTokens(ids, positions, Config.MaxPositions, Config.VocabSize);
        return Lookup(ids);
    }

    Tensor Lookup(Tensor ids)
    {
        using var scope = NewDisposeScope();
        long b = ids.shape[0], t = ids.shape[1];
        return ScaleEmbeddings(_embedTokens.index_select(0, ids.reshape(-1).to(Device)).to(ComputeDType)).view(b, t, -1).MoveToOuterDisposeScope();
    }

    /// <summary>Hidden states after the last layer → logits [batch, tokens, vocab].</summary>
    public Tensor Head(Tensor h)
    {
        using var scope = NewDisposeScope();
        return CapLogits(F.linear(FinalNorm(h, _norm), HeadWeight)).MoveToOuterDisposeScope();
    }

    public IEnumerable<(string Name, Tensor Tensor)> OuterTensors(ScalarType dtype)
    {
        yield return (Prefix + "embed_tokens.weight", _embedTokens.to(dtype));
        yield return (Prefix + "norm.weight", _norm.to(dtype));
        if (_lmHead is not null) yield return ("lm_head.weight", _lmHead.to(dtype));
    }

    public long BlockParameters(int i) => BlockTensors(i).Sum(t => t.Shape.Aggregate(1L, (x, y) => x * y));

    public long ParameterCount() =>
        (long)Config.VocabSize * Config.Hidden * (Config.TieWordEmbeddings ? 1 : 2) + Config.Hidden
        + Enumerable.Range(0, Config.Layers).Sum(BlockParameters);

    /// <summary>Every tensor the config implies, under its checkpoint name.</summary>
    protected IEnumerable<(string Name, long[] Shape)> ExpectedTensors()
    {
        var c = Config;
        yield return (Prefix + "embed_tokens.weight", new long[] { c.VocabSize, c.Hidden });
        yield return (Prefix + "norm.weight", new long[] { c.Hidden });
        if (!c.TieWordEmbeddings) yield return ("lm_head.weight", new long[] { c.VocabSize, c.Hidden });
        for (int i = 0; i < c.Layers; i++)
            foreach (var (name, shape) in BlockTensors(i)) yield return ($"{Prefix}layers.{i}.{name}", shape);
    }
}
