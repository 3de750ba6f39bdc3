using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>
/// A set of units whose outputs feed one linear consumer y = W a (+ c) (snp.md §1). Units come in
/// groups of <see cref="GroupSize"/> kept or removed whole: a head (or a K/V group of query heads)
/// of an attention layer, one neuron of an MLP.
/// </summary>
public sealed record NodeLayerInfo(string Name, NodeKind Kind, int Units, int GroupSize, long ParamsPerGroup)
{
    public int Groups => Units / GroupSize;
}

/// <summary>Heads (or K/V groups) of an attention layer, neurons of a dense MLP, neurons of a mixture's experts.</summary>
public enum NodeKind { Heads, Mlp, Expert }

/// <summary>The node kinds' names, as options (`--targets`) and reports spell them: the one place they are spelled.</summary>
public static class NodeKinds
{
    public static readonly IReadOnlyList<NodeKind> All = new[] { NodeKind.Mlp, NodeKind.Heads, NodeKind.Expert };

    public static string Name(NodeKind k) => k switch { NodeKind.Heads => "heads", NodeKind.Expert => "experts", _ => "mlp" };

    /// <summary>Kinds whose units are MLP neurons (a width multiple applies to them).</summary>
    public static bool IsNeurons(NodeKind k) => k is NodeKind.Mlp or NodeKind.Expert;

    public static NodeKind Parse(string s, string option) =>
        All.Cast<NodeKind?>().FirstOrDefault(k => Name(k!.Value) == s)
        ?? throw new LlmSnpException($"{option}: unknown target '{s}' ({string.Join(", ", All.Select(Name))})");

    /// <summary>A comma-separated target set ("mlp,heads"); empty or unknown entries are refused.</summary>
    public static IReadOnlySet<NodeKind> ParseSet(string s, string option)
    {
        var parts = s.Split(',', StringSplitOptions.TrimEntries);
        if (parts.All(p => p.Length == 0)) throw new LlmSnpException($"{option}: empty target set ({string.Join(", ", All.Select(Name))})");
        return parts.Select(p => p.Length == 0 ? throw new LlmSnpException($"{option}: empty entry in '{s}'") : Parse(p, option)).ToHashSet();
    }

    /// <summary>The set as options spell it, in a fixed order (mlp, heads, experts).</summary>
    public static string Describe(IReadOnlySet<NodeKind> kinds) => string.Join(",", All.Where(kinds.Contains).Select(Name));
}

/// <summary>
/// One transformer block, resident on the device, as the pruning engine sees it. The engine
/// never learns which family the block belongs to: it runs it, reads the consumer of a node
/// layer, and asks the block to keep a subset of units with a new consumer.
/// </summary>
public interface IPrunableBlock : IDisposable
{
    /// <summary>
    /// Disposes the block, handing its weights to the next <c>LoadBlock</c> of the same model for reuse
    /// (for a dense stream that loads block after block: no fresh memory per block). Nothing else may
    /// still hold one of its tensors.
    /// </summary>
    void Recycle();

    /// <summary>Node layers in the order they are pruned (heads, then the MLP).</summary>
    IReadOnlyList<NodeLayerInfo> NodeLayers { get; }

    /// <summary>
    /// The node layers grouped by the sub-block they belong to, in order: one node layer reads each sub-block's
    /// input in a chain (attention, then a dense MLP); several read the same input where they run in parallel and
    /// their consumers' outputs are summed with weights (the experts of a mixture).
    /// </summary>
    IReadOnlyList<int[]> SubBlocks { get; }

    /// <summary>
    /// Sub-block <paramref name="subBlock"/>'s node layers on the residual stream entering it: each layer's activations
    /// [rows, units] and the weight its consumer's output carries per row ([rows]; null: 1) go to
    /// <paramref name="collect"/>; nothing past them is computed. A least-squares fit of a consumer then weighs each
    /// row as the block's output does.
    /// </summary>
    void Collect(int subBlock, Tensor input, Action<int, Tensor, Tensor?> collect);

    /// <summary>The residual stream leaving sub-block <paramref name="subBlock"/>, given the one entering it.</summary>
    Tensor Advance(int subBlock, Tensor input);

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

    /// <summary>The consumer's weight [out, units] and bias [out] of a node layer; null where it has no bias.</summary>
    (Tensor Weight, Tensor? Bias) Consumer(int layer);

    /// <summary>Per unit: squared L2 norm of its producer rows and biases (for the magnitude baseline).</summary>
    Tensor ProducerSquaredNorms(int layer);

    /// <summary>
    /// Keeps the given units (ascending indices into the current units, whole groups) and installs the
    /// new consumer; a bias given to a consumer that had none is added to the block.
    /// </summary>
    void Prune(int layer, long[] keptUnits, Tensor consumerWeight, Tensor? consumerBias);

    /// <summary>Original indices of the groups a node layer keeps (heads / K/V groups, or neurons).</summary>
    long[] KeptGroups(int layer);

    /// <summary>
    /// Whether node layer <paramref name="layer"/>'s consumer, where it has no bias, may be given one: only where the
    /// family's stock class has a parameter for it (a bias it cannot hold would make the checkpoint unloadable there).
    /// Otherwise <paramref name="reason"/> says why, for the report.
    /// </summary>
    bool CanAddConsumerBias(int layer, out string reason);

    /// <summary>The block's current tensors under the checkpoint's own names, in the stored dtype.</summary>
    IEnumerable<(string Name, Tensor Tensor)> Tensors(ScalarType dtype);

    /// <summary>The same tensors at their original shapes, pruned rows and columns zero.</summary>
    IEnumerable<(string Name, Tensor Tensor)> PaddedTensors(ScalarType dtype);
}

/// <summary>
/// What one pruned block kept: its original layer index (a checkpoint written without some blocks renumbers the
/// rest), per node layer the original group indices, and whether its consumer now has a bias.
/// </summary>
public sealed record KeptBlock(int Layer, IReadOnlyList<long[]> Groups, IReadOnlyList<bool> ConsumerBias)
{
    /// <summary>A mixture's kept experts (original indices), in the order they are written; null for a dense block.</summary>
    public IReadOnlyList<long>? Experts { get; init; }
}

/// <summary>A model family as the pruning engine and the jobs see it: streamed block by block.</summary>
public interface IPrunableModel : IDisposable
{
    /// <summary>The family's name in reports (opt, vit, llama).</summary>
    string Family { get; }
    string ModelDir { get; }
    int BlockCount { get; }
    Device Device { get; }
    ScalarType ComputeDType { get; }
    /// <summary>The dtype weights are written in (the stored one).</summary>
    ScalarType StoredDType { get; }

    /// <summary>Hidden states [batch, tokens, width] for a batch of model inputs (ids or pixels).</summary>
    Tensor Embed(Tensor inputs);

    IPrunableBlock LoadBlock(int index);

    /// <summary>Hidden states after the last block → logits ([batch, tokens, vocab] or [batch, classes]).</summary>
    Tensor Head(Tensor hidden);

    /// <summary>Parameters of the model as configured (per-layer widths honoured).</summary>
    long ParameterCount();

    /// <summary>Tensors outside the blocks (embeddings, final norm, head), unchanged by pruning.</summary>
    IEnumerable<(string Name, Tensor Tensor)> OuterTensors(ScalarType dtype);

    /// <summary>config.json of the pruned model.</summary>
    JsonObject PrunedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype);

    /// <summary>
    /// Why the stock HF class of the family cannot build the pruned checkpoint's shapes from its config.json alone,
    /// or null where it can (pruning_config.json's `stock_loadable`).
    /// </summary>
    string? NotStockLoadable(IReadOnlyList<KeptBlock> kept);

    /// <summary>config.json of the zero-padded export: the original shapes, loadable by stock tools.</summary>
    JsonObject PaddedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype);

    /// <summary>Files besides the weights and config that a checkpoint carries (tokenizer, preprocessor).</summary>
    IEnumerable<string> CompanionFiles();

    /// <summary>Stored tensors the model does not use (a warning: HF ignores them too).</summary>
    IReadOnlyList<string> UnusedTensors { get; }

    /// <summary>Bytes copied out of the weight files so far (each tensor is read once per pass).</summary>
    long BytesRead { get; }

    /// <summary>SHA-256 of every weight file, for provenance.</summary>
    IReadOnlyDictionary<string, string> SourceHashes();

    /// <summary>`llmsnp inspect`: the family's own description of the checkpoint (fields, per-layer widths).</summary>
    JsonObject Describe();
}

/// <summary>
/// A decoder block as the language-model paths run it beyond the plain causal <see cref="IPrunableBlock.Forward"/>:
/// incrementally for generation (the tokens at positions <c>position</c>.. attend to the keys and values cached for
/// the earlier ones; every block resident, each with its own cache), and on packed rows with an explicit attention
/// mask for task evaluation (docs/models.md, "Packed rows").
/// </summary>
public interface ICachedBlock : IPrunableBlock
{
    /// <summary>
    /// Hidden states [batch, t, width] of the tokens at positions position..position+t-1 → the block's output for
    /// them; their keys and values are appended to <paramref name="cache"/>, which holds exactly the positions before.
    /// </summary>
    Tensor Step(Tensor hidden, KvCache cache, int position);

    /// <summary>
    /// The block on packed, padded rows: hidden [batch, t, width]; <paramref name="positions"/> [batch, t] (int64) each
    /// token's position in its own sequence (the rotary angle; a family with learned positions adds them in
    /// <see cref="ILanguageModel.EmbedAt(Tensor, Tensor)"/> and ignores them here); <paramref name="attend"/> [batch, t, t]
    /// (bool, true where query i may read key j), built by the caller: several sequences, or one shared context and its
    /// continuations, share a row, and every token (padding too) sees at least itself. A family with a sliding window
    /// narrows the mask further by the positions. Equals <see cref="IPrunableBlock.Forward"/> of each sequence alone.
    /// </summary>
    Tensor ForwardMasked(Tensor hidden, Tensor positions, Tensor attend);
}

/// <summary>A language model: token ids in, next-token logits out.</summary>
public interface ILanguageModel : IPrunableModel
{
    int MaxPositions { get; }
    int VocabSize { get; }
    /// <summary>The checkpoint's own tokenizer; one clear error if it has none.</summary>
    Data.ITextTokenizer Tokenizer();

    /// <summary>Hidden states for ids [batch, t] standing at positions start..start+t-1 (generation continues a sequence); a name of its own, so that `Embed` stays one method group.</summary>
    Tensor EmbedAt(Tensor ids, int startPosition);

    /// <summary>Hidden states for ids [batch, t] at per-token positions [batch, t] (packed rows, <see cref="ICachedBlock.ForwardMasked"/>).</summary>
    Tensor EmbedAt(Tensor ids, Tensor positions);

    /// <summary>Decoder block <paramref name="index"/> with its cached forward (<see cref="ICachedBlock.Step"/>).</summary>
    ICachedBlock LoadCachedBlock(int index);
}

/// <summary>An image classifier: preprocessed pixels in, class logits out.</summary>
public interface IImageClassifier : IPrunableModel
{
    int Classes { get; }
    /// <summary>Input images are [batch, Channels, ImageSize, ImageSize], already normalised.</summary>
    int Channels { get; }
    int ImageSize { get; }
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
