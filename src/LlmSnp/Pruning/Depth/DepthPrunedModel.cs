using System.Text.Json.Nodes;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Pruning.Depth;

/// <summary>
/// A model as the depth plan leaves it, seen by the width engine and the writer: only the kept blocks, in order, each
/// loaded from the source with its replacement folded into its MLP consumer where a removed span follows it. Block k
/// is original block <see cref="DepthPlan.Kept"/>[k]; its tensors keep their original names until written
/// (<see cref="LayerRenumbering"/>).
/// </summary>
public sealed class DepthPrunedModel : IPrunableModel
{
    readonly IPrunableModel _inner;
    readonly DepthPlan _plan;
    readonly int[] _kept;

    public DepthPrunedModel(IPrunableModel inner, DepthPlan plan)
    {
        _inner = inner; _plan = plan; _kept = plan.Kept.ToArray();
    }

    /// <summary>The original index of kept block <paramref name="k"/>.</summary>
    public int Original(int k) => _kept[k];

    public string Family => _inner.Family;
    public string ModelDir => _inner.ModelDir;
    public int BlockCount => _kept.Length;
    public Device Device => _inner.Device;
    public ScalarType ComputeDType => _inner.ComputeDType;
    public ScalarType StoredDType => _inner.StoredDType;
    public Tensor Embed(Tensor inputs) => _inner.Embed(inputs);
    public Tensor Head(Tensor hidden) => _inner.Head(hidden);
    public long ParameterCount() => _inner.ParameterCount();
    public IEnumerable<(string Name, Tensor Tensor)> OuterTensors(ScalarType dtype) => _inner.OuterTensors(dtype);
    public IEnumerable<string> CompanionFiles() => _inner.CompanionFiles();
    public IReadOnlyList<string> UnusedTensors => _inner.UnusedTensors;
    public long BytesRead => _inner.BytesRead;
    public IReadOnlyDictionary<string, string> SourceHashes() => _inner.SourceHashes();
    public JsonObject Describe() => _inner.Describe();
    public IReadOnlyList<string>? LayerTypes => _inner.LayerTypes is { } t ? _kept.Select(i => t[i]).ToArray() : null;

    public IPrunableBlock LoadBlock(int index)
    {
        int orig = _kept[index];
        var block = _inner.LoadBlock(orig);
        try
        {
            var fold = _plan.FoldInto(orig);
            if (fold is null && !_plan.AddsConsumerBias) return block;
            int j = DepthScan.MlpLayer(block, orig);
            var (w, c) = block.Consumer(j);
            var all = Enumerable.Range(0, block.NodeLayers[j].Units).Select(u => (long)u).ToArray();
            if (fold is null)
            {
                // A fold elsewhere gave its consumer a bias: the config's flag is one for the model, so every kept block
                // carries one (zero: the block computes what it did).
                if (c is null && block.CanAddConsumerBias(j, out _)) block.Prune(j, all, w.clone(), torch.zeros(w.shape[0], w.dtype, w.device));
                return block;
            }
            using var scope = NewDisposeScope();
            // x → x + x·M + t on the consumer's output: W' = W + MᵀW, b' = b + Mᵀb + t (row vectors, y = a·Wᵀ + b).
            var m = fold.M.to(ScalarType.Float64, w.device);
            var w64 = w.to(ScalarType.Float64);
            var wNew = w64 + m.T.matmul(w64);
            Tensor? bNew = null;
            if (c is not null || fold.T is not null)
            {
                var b64 = c?.to(ScalarType.Float64) ?? torch.zeros(w.shape[0], ScalarType.Float64, w.device);
                bNew = b64 + m.T.matmul(b64);
                if (fold.T is not null) bNew = bNew + fold.T.to(w.device);
                bNew = bNew.to(w.dtype);
            }
            block.Prune(j, all, wNew.to(w.dtype), bNew);
            return block;
        }
        catch
        {
            block.Dispose();
            throw;
        }
    }

    public JsonObject PrunedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = _inner.PrunedConfig(kept, dtype);
        LayerRenumbering.Config(cfg, _kept, _plan.OriginalBlocks, _inner.LayerTypes);
        return cfg;
    }

    public string? NotStockLoadable(IReadOnlyList<KeptBlock> kept) => _inner.NotStockLoadable(kept);

    public JsonObject PaddedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype) =>
        throw new LlmSnpException("--export-padded with --drop-blocks: a removed block has no zero-padded form (write the depth-pruned checkpoint alone)");

    /// <summary>The source model stays open: it belongs to the caller.</summary>
    public void Dispose() { }
}

/// <summary>The width pass of a depth-only prune: every kept block written whole (with its fold), nothing measured.</summary>
public static class WholeBlocks
{
    public static PruneResult Run(IPrunableModel model, Action<IPrunableBlock, int> onBlockDone, Action<string>? log)
    {
        var kept = new List<KeptBlock>();
        for (int b = 0; b < model.BlockCount; b++)
        {
            using var block = model.LoadBlock(b);
            var layers = block.NodeLayers;
            kept.Add(new KeptBlock(b, layers.Select((_, j) => block.KeptGroups(j)).ToArray(), layers.Select((_, j) => block.Consumer(j).Bias is not null).ToArray()));
            onBlockDone(block, b);
            log?.Invoke($"block {b + 1}/{model.BlockCount} written whole");
        }
        return new PruneResult { Layers = Array.Empty<NodeLayerReport>(), Kept = kept };
    }
}
