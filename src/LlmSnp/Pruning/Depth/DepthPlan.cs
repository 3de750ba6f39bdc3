using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LlmSnp.Pruning.Depth;

/// <summary>A candidate for removal and its criterion score: a span of <see cref="Length"/> blocks from <see cref="Start"/> (one block for influence).</summary>
public sealed record SpanScore(int Start, int Length, double Score);

/// <summary>
/// The least-squares replacement of one removed span [Start, End): the preceding block's MLP output x becomes
/// x + x·M + t, i.e. x·T + t with T = I + M, folded into that block's MLP consumer as W' = W + MᵀW, b' = b + Mᵀb + t
/// (docs/depth.md). M [hidden, hidden] and t [hidden] (null: fitted without a mean term) are float64 on the CPU.
/// </summary>
public sealed record SpanFold(int Start, int End, int Target, Tensor M, Tensor? T, double RelativeError, double DropRelativeError, double Lambda, int Escalations);

/// <summary>What the depth pass decided: the blocks removed (original indices), the scores, and per removed span its error and fold.</summary>
public sealed class DepthPlan : IDisposable
{
    public required DepthOptions Options { get; init; }
    public required int OriginalBlocks { get; init; }
    public required IReadOnlyList<int> Removed { get; init; }
    public IReadOnlyList<int> Kept => Enumerable.Range(0, OriginalBlocks).Where(i => !Removed.Contains(i)).ToArray();
    /// <summary>Every candidate's score under the criterion (empty where named blocks were not scored).</summary>
    public required IReadOnlyList<SpanScore> Scores { get; init; }
    /// <summary>The removed spans (maximal runs of consecutive removed blocks), with their measured errors.</summary>
    public required IReadOnlyList<SpanFold> Spans { get; init; }
    /// <summary>Why some candidates were not eligible (block 0 with a least-squares replacement), or null.</summary>
    public string? Excluded { get; init; }
    /// <summary>Whether some fold gave its consumer a mean term that it had no bias for (every kept block then gets a zero bias there).</summary>
    public bool AddsConsumerBias { get; init; }
    public double Seconds { get; init; }

    /// <summary>The fold whose target is original block <paramref name="block"/>, or null.</summary>
    public SpanFold? FoldInto(int block) =>
        Options.Replace == DepthReplace.Lstsq ? Spans.FirstOrDefault(s => s.Target == block) : null;

    /// <summary>Maximal runs of consecutive indices: [start, end) each.</summary>
    public static List<(int Start, int End)> Runs(IEnumerable<int> sorted)
    {
        var runs = new List<(int Start, int End)>();
        foreach (var i in sorted)
            if (runs.Count > 0 && runs[^1].End == i) runs[^1] = (runs[^1].Start, i + 1);
            else runs.Add((i, i + 1));
        return runs;
    }

    /// <summary>pruning_config.json's `depth` section.</summary>
    public JsonObject ToJson() => new()
    {
        ["original_blocks"] = OriginalBlocks,
        ["removed_blocks"] = new JsonArray(Removed.Select(i => (JsonNode)i).ToArray()),
        ["kept_blocks"] = new JsonArray(Kept.Select(i => (JsonNode)i).ToArray()),
        ["kept_blocks_meaning"] = "original index of each written layer, in order (layer k of this checkpoint is original block kept_blocks[k])",
        ["chosen_by"] = Options.Named is null ? "criterion" : "named",
        ["criterion"] = DepthOptions.Name(Options.Criterion),
        ["criterion_scored"] = Scores.Count > 0,
        ["criterion_meaning"] = Options.Criterion switch
        {
            DepthCriterion.Influence => "per block: 1 - mean cosine(input, output) over calibration tokens; lowest removed",
            DepthCriterion.Angular => "per span of n blocks: mean arccos(cosine(input, output)) / pi over calibration tokens; lowest removed",
            _ => "per span of n blocks: residual of the least-squares replacement / the variance of the stream leaving the span; lowest removed",
        },
        ["excluded"] = Excluded,
        ["scores"] = new JsonArray(Scores.Select(s => (JsonNode)new JsonObject { ["start"] = s.Start, ["blocks"] = s.Length, ["score"] = s.Score }).ToArray()),
        ["replace"] = DepthOptions.Name(Options.Replace),
        ["damp"] = Options.Damp,
        ["spans"] = new JsonArray(Spans.Select(s => (JsonNode)new JsonObject
        {
            ["start"] = s.Start, ["end"] = s.End,
            ["fold_target_block"] = Options.Replace == DepthReplace.Lstsq ? s.Target : null,
            ["fold_mean_term"] = Options.Replace == DepthReplace.Lstsq ? s.T is not null : null,
            // The relative residual of what the span added, over the variance of the stream leaving it, on the calibration set.
            ["replacement_relative_error"] = Options.Replace == DepthReplace.Lstsq ? s.RelativeError : s.DropRelativeError,
            ["drop_relative_error"] = s.DropRelativeError,
            ["damping_lambda"] = Options.Replace == DepthReplace.Lstsq ? s.Lambda : null,
            ["damping_escalations"] = Options.Replace == DepthReplace.Lstsq ? s.Escalations : null,
        }).ToArray()),
        ["adds_consumer_bias"] = AddsConsumerBias,
        ["seconds"] = Seconds,
    };

    public void Dispose()
    {
        foreach (var s in Spans) { s.M.Dispose(); s.T?.Dispose(); }
    }
}
