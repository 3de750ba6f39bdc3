using LlmSnp.Checkpoint;
using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>
/// What every streamed model shares, whatever its family: the checkpoint it reads blocks from, the compute and
/// stored dtypes, provenance (hashes, bytes read), the files a checkpoint carries besides weights, and the
/// tensors outside the blocks that stay resident (released with the model). A family's model class derives from
/// it and adds its config, its embedding and head, and its blocks.
/// </summary>
public abstract class StreamedModel : IDisposable
{
    readonly List<Tensor> _resident = new();
    readonly string[] _companionFiles;

    /// <param name="companionFiles">File names a checkpoint of the family carries besides weights and config (tokenizer, preprocessor).</param>
    protected StreamedModel(string modelDir, Device? device, ScalarType computeDType, params string[] companionFiles)
    {
        ModelDir = modelDir;
        Device = device ?? CPU;
        ComputeDType = computeDType;
        _companionFiles = companionFiles;
        Checkpoint = new CheckpointReader(modelDir);
    }

    public string ModelDir { get; }
    public Device Device { get; }
    public ScalarType ComputeDType { get; }
    /// <summary>The dtype weights are written in (the stored one).</summary>
    public ScalarType StoredDType { get; protected set; }
    public CheckpointReader Checkpoint { get; }

    /// <summary>Stored tensors the model does not use (a warning: HF ignores them too).</summary>
    public IReadOnlyList<string> UnusedTensors { get; protected set; } = Array.Empty<string>();

    public long BytesRead => Checkpoint.BytesRead;

    public IReadOnlyDictionary<string, string> SourceHashes() => Checkpoint.Sha256();

    public IEnumerable<string> CompanionFiles() => _companionFiles.Select(f => Path.Combine(ModelDir, f)).Where(File.Exists);

    /// <summary>A stored tensor of the expected shape, in <paramref name="dtype"/> on the model's device.</summary>
    protected Tensor ReadAs(string name, ScalarType dtype, params long[] shape) => Checkpoint.ReadShaped(name, dtype, Device, shape);

    /// <summary>A tensor that lives as long as the model (embeddings, final norm, head).</summary>
    protected Tensor Resident(Tensor t)
    {
        _resident.Add(t);
        return t;
    }

    /// <summary>Token ids [batch, t] at positions start.. must fit the vocabulary and the position table.</summary>
    protected void CheckTokens(Tensor ids, int startPosition, int maxPositions, int vocabSize)
    {
        if (startPosition < 0) throw new ArgumentOutOfRangeException(nameof(startPosition));
        if (startPosition + ids.shape[1] > maxPositions)
            throw new LlmSnpException($"sequence of {startPosition + ids.shape[1]} tokens exceeds max_position_embeddings {maxPositions}");
        CheckVocabulary(ids, vocabSize);
    }

    /// <summary>The same for packed rows, each token at its own position.</summary>
    protected void CheckPackedTokens(Tensor ids, Tensor positions, int maxPositions, int vocabSize)
    {
        if (positions.numel() > 0)
        {
            long maxPos = positions.max().item<long>(), minPos = positions.min().item<long>();
            if (minPos < 0) throw new ArgumentOutOfRangeException(nameof(positions));
            if (maxPos >= maxPositions) throw new LlmSnpException($"position {maxPos} exceeds max_position_embeddings {maxPositions}");
        }
        CheckVocabulary(ids, vocabSize);
    }

    void CheckVocabulary(Tensor ids, int vocabSize)
    {
        if (ids.numel() == 0) return;
        long maxId = ids.max().item<long>(), minId = ids.min().item<long>();
        if (maxId >= vocabSize || minId < 0)
            throw new LlmSnpException($"token id {(minId < 0 ? minId : maxId)} is outside the vocabulary of {ModelDir} (vocab_size {vocabSize}); is this the model's tokenizer?");
    }

    public virtual void Dispose()
    {
        foreach (var t in _resident) t.Dispose();
        _resident.Clear();
        Checkpoint.Dispose();
    }
}
