using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LlmSnp.Pruning;

/// <summary>
/// A set of units whose outputs feed one linear consumer y = W a + c (snp.md §1).
/// Heads are groups of <see cref="GroupSize"/> consecutive units kept or removed whole.
/// </summary>
public sealed record NodeLayerInfo(string Name, NodeKind Kind, int Units, int GroupSize, long ParamsPerGroup)
{
    public int Groups => Units / GroupSize;
}

public enum NodeKind { Heads, Mlp }

/// <summary>
/// One transformer block, resident on the device, as the pruning engine sees it. The engine
/// never learns which family the block belongs to: it runs it, reads the consumer of a node
/// layer, and asks the block to keep a subset of units with a new consumer.
/// </summary>
public interface IPrunableBlock : IDisposable
{
    /// <summary>Node layers in the order they are pruned (heads, then the MLP).</summary>
    IReadOnlyList<NodeLayerInfo> NodeLayers { get; }

    /// <summary>
    /// Runs the block on hidden states [batch, tokens, width]. With <paramref name="captureLayer"/> ≥ 0,
    /// hands that node layer's activations [batch·tokens, units] to <paramref name="capture"/> and
    /// returns null without computing the rest of the block.
    /// </summary>
    Tensor? Forward(Tensor hidden, int captureLayer = -1, Action<Tensor>? capture = null);

    /// <summary>
    /// Node layer <paramref name="layer"/>'s activations [batch, tokens, units] from the residual
    /// stream entering its sub-block (the block input for the first node layer).
    /// </summary>
    Tensor Activations(int layer, Tensor input);

    /// <summary>The residual stream leaving node layer <paramref name="layer"/>'s sub-block, given its input and activations.</summary>
    Tensor Residual(int layer, Tensor input, Tensor activations);

    /// <summary>The consumer's weight [out, units] and bias [out] of a node layer.</summary>
    (Tensor Weight, Tensor Bias) Consumer(int layer);

    /// <summary>Per unit: squared L2 norm of its producer rows and biases (for the magnitude baseline).</summary>
    Tensor ProducerSquaredNorms(int layer);

    /// <summary>Keeps the given units (ascending original indices) and installs the new consumer.</summary>
    void Prune(int layer, long[] keptUnits, Tensor consumerWeight, Tensor consumerBias);

    /// <summary>The block's current tensors under the checkpoint's own names, in the stored dtype.</summary>
    IEnumerable<(string Name, Tensor Tensor)> Tensors(ScalarType dtype);

    /// <summary>The same tensors at their original shapes, pruned rows and columns zero.</summary>
    IEnumerable<(string Name, Tensor Tensor)> PaddedTensors(ScalarType dtype);
}

/// <summary>A model family as the pruning engine sees it: streamed block by block.</summary>
public interface IPrunableModel : IDisposable
{
    string Family { get; }
    int BlockCount { get; }
    Device Device { get; }
    ScalarType ComputeDType { get; }
    /// <summary>The dtype weights are written in (the stored one).</summary>
    ScalarType StoredDType { get; }

    /// <summary>Hidden states [batch, tokens, width] for a batch of model inputs (ids or pixels).</summary>
    Tensor Embed(Tensor inputs);

    IPrunableBlock LoadBlock(int index);

    /// <summary>Tensors outside the blocks (embeddings, final norm, head), unchanged by pruning.</summary>
    IEnumerable<(string Name, Tensor Tensor)> OuterTensors(ScalarType dtype);

    /// <summary>config.json of the pruned model: unitsKept[block][nodeLayer] is the kept unit count.</summary>
    JsonObject PrunedConfig(IReadOnlyList<int[]> unitsKept, IReadOnlyList<long[]> headsKeptIndices, ScalarType dtype);

    /// <summary>Files besides the weights and config that a checkpoint carries (tokenizer, preprocessor).</summary>
    IEnumerable<string> CompanionFiles();
}

public static class PrunableBlockExtensions
{
    /// <summary>Moves every hidden micro-batch through the block, releasing the old ones.</summary>
    public static void Advance(this IPrunableBlock block, List<Tensor> hidden)
    {
        for (int k = 0; k < hidden.Count; k++)
        {
            var next = block.Forward(hidden[k])!;
            hidden[k].Dispose();
            hidden[k] = next;
        }
    }
}
