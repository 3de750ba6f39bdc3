using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Pruning;

/// <summary>The engine's step for the experts of a mixture: expert removal, then each kept expert's neurons.</summary>
public sealed partial class SnpEngine
{
    /// <summary>
    /// The expert sub-block of a mixture: with `--experts-keep`, the experts are chosen and removed first
    /// (<see cref="ExpertRemoval"/>); one routing pass through the reduced block then collects each kept expert's
    /// Gram from its routed tokens (weighted by its routing weight) and the fold of the removed experts; the fold is
    /// applied, each targeted expert pruned, and the stream advanced.
    /// </summary>
    void MixtureLayers(RunState run, IMixtureBlock block, int s, List<Tensor> hidden, UseStatistics use)
    {
        run.Statistics.Start();
        var first = block.NodeLayers[block.SubBlocks[s][0]].Name;
        string name = first[..first.LastIndexOf('.')];
        long[]? forced = run.ExpertPlan is { } plan && plan.TryGetValue(run.Block, out var p) ? p : null;
        using var removal = _opt.Experts is { } ex ? ExpertRemoval.Begin(block, hidden, ex, _opt.Damp, name, forced) : null;
        run.ExpertChoices[run.Block] = block.KeptExperts;
        var infos = block.NodeLayers;
        var layers = block.SubBlocks[s];
        var targeted = layers.Where(j => _opt.Prunes(infos[j].Kind)).ToArray();
        var accs = targeted.ToDictionary(j => j, j => new GramAccumulator(infos[j].Units, _model.Device));
        var tokens = new long[layers.Length];
        try
        {
            for (int k = 0; k < hidden.Count; k++)
            {
                void Add(RoutedBatch r)
                {
                    tokens[r.Expert] += r.Slots.shape[0];
                    if (accs.TryGetValue(r.Layer, out var acc)) acc.Add(r.Activations, r.Weights);
                }
                if (removal is not null) removal.Observe(k, hidden[k], Add);
                else block.Route(hidden[k], Add);
            }
            // Fewer tokens than neurons: the Gram is singular. Equal widths need every expert pruned alike.
            bool keepWhole = _opt.FewTokenExperts == FewTokenPolicy.KeepWhole && !_opt.UniformWidths;
            var few = new List<(long Expert, long Tokens, string Handled)>();
            var experts = block.KeptExperts;
            for (int e = 0; e < layers.Length; e++)
            {
                int j = block.ExpertLayer(e);
                if (tokens[e] >= infos[j].Units) continue;
                string handled = !accs.ContainsKey(j) ? "not pruned (not targeted)"
                    : keepWhole ? "kept whole"
                    : tokens[e] == 0 ? "no tokens: neurons ordered by weight norms, nothing reconstructed"
                    : "pruned on the damped Gram";
                few.Add((experts[e], tokens[e], handled));
            }
            run.Mixtures.Add(removal?.Finish(tokens, few) ?? Unremoved(block, name, experts, tokens, hidden, few));
            for (int e = 0; e < layers.Length; e++)
            {
                int j = block.ExpertLayer(e);
                if (!accs.TryGetValue(j, out var acc)) continue;
                if (tokens[e] < infos[j].Units && keepWhole) KeptWhole(run, infos[j], block, j, $"kept whole: {tokens[e]} calibration tokens for {infos[j].Units} neurons");
                else if (tokens[e] == 0) NoTokens(run, block, j, infos[j], use);
                else Decompose(run, acc, j, infos[j], use);
                run.Statistics.Start();
            }
        }
        finally { foreach (var acc in accs.Values) acc.Dispose(); }
        for (int k = 0; k < hidden.Count; k++)
        {
            var next = block.Advance(s, hidden[k]);
            hidden[k].Dispose();
            hidden[k] = next;
        }
        run.Statistics.Stop();
    }

    /// <summary>The layer's report where no expert is removed: tokens per expert, all kept.</summary>
    static MixtureReport Unremoved(IMixtureBlock block, string name, long[] experts, long[] tokens, List<Tensor> hidden,
        IReadOnlyList<(long, long, string)> few) => new()
    {
        Name = name, Experts = experts.Length, TopK = block.TopK, Kept = experts,
        Records = experts.Select((x, e) => new ExpertRecord(x, tokens[e], tokens[e], tokens[e], true, 1, null)).ToList(),
        Tokens = hidden.Sum(h => h.numel() / h.shape[^1]), FewTokens = few,
    };

    /// <summary>An expert left at its full width (too few tokens): reported as a layer that kept every unit.</summary>
    void KeptWhole(RunState run, NodeLayerInfo info, IPrunableBlock block, int j, string why)
    {
        run.ParamsPerGroup[info.Name] = info.ParamsPerGroup;
        var all = Enumerable.Range(0, info.Units).Select(u => (long)u).ToArray();
        run.Reports.Add(new NodeLayerReport
        {
            Name = info.Name, Kind = NodeKinds.Name(info.Kind), Units = info.Units, GroupSize = info.GroupSize,
            UnitsKept = info.Units, KeptIndices = block.KeptGroups(j), Error = 0, RelativeError = 0, Lambda = 0, DampingEscalations = 0,
            ParamsRemoved = 0, Constant = false, KeptUnits = all, Reconstruct = "none", KeptWholeBecause = why,
        });
    }

    /// <summary>
    /// An expert no calibration token reached: its Gram is the diagonal of its producers' squared row norms (a proxy
    /// for each neuron's activation energy, no correlations), so the ordering keeps the heaviest neurons and the least
    /// squares, having no evidence, leaves the kept columns as they are.
    /// </summary>
    void NoTokens(RunState run, IMixtureBlock block, int j, NodeLayerInfo info, UseStatistics use)
    {
        run.Statistics.Stop();
        run.Decomposition.Start();
        try
        {
            using var scope = NewDisposeScope();
            var g = torch.zeros(info.Units + 1, info.Units + 1, ScalarType.Float64, _model.Device);
            g[0, 0] = 1.0;
            g.diagonal().narrow(0, 1, info.Units).copy_(block.ProducerSquaredNorms(j).to(ScalarType.Float64));
            use(j, info, g);
        }
        finally { run.Decomposition.Stop(); }
    }
}
