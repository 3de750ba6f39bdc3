namespace LlmSnp.Pruning.Depth;

/// <summary>How the blocks to remove are chosen (`--depth-criterion`).</summary>
public enum DepthCriterion
{
    /// <summary>ShortGPT's block influence: 1 − mean cosine of a block's input and output; the lowest go.</summary>
    Influence,
    /// <summary>Gromov et al.: the span of n consecutive blocks whose input and output are closest in angle.</summary>
    Angular,
    /// <summary>The span whose least-squares replacement leaves the smallest residual relative to the stream's variance.</summary>
    Lstsq,
}

/// <summary>How a removed span is replaced (`--depth-replace`).</summary>
public enum DepthReplace
{
    /// <summary>Dropped: the stream skips the span.</summary>
    None,
    /// <summary>A linear map over the hidden size fitted by least squares, folded into the preceding block's MLP consumer.</summary>
    Lstsq,
}

/// <summary>Everything that decides which blocks `prune --drop-blocks` removes and how.</summary>
public sealed record DepthOptions
{
    /// <summary>Blocks removed when chosen by the criterion; ignored where <see cref="Named"/> is set.</summary>
    public int Count { get; init; }
    /// <summary>Blocks named by their original index (ascending, distinct), or null: the criterion chooses.</summary>
    public IReadOnlyList<int>? Named { get; init; }
    public DepthCriterion Criterion { get; init; } = DepthCriterion.Angular;
    /// <summary>Whether the criterion was asked for (named blocks are then scored too, for the report).</summary>
    public bool CriterionGiven { get; init; }
    public DepthReplace Replace { get; init; } = DepthReplace.None;
    /// <summary>Damping of the replacement's Gram, as SNP's reconstruction (relative to the mean diagonal).</summary>
    public double Damp { get; init; } = 0.01;

    public int Removed => Named?.Count ?? Count;

    public static string Name(DepthCriterion c) => c switch { DepthCriterion.Influence => "influence", DepthCriterion.Angular => "angular", _ => "lstsq" };
    public static string Name(DepthReplace r) => r == DepthReplace.None ? "none" : "lstsq";

    public static DepthCriterion ParseCriterion(string s) => s switch
    {
        "influence" => DepthCriterion.Influence, "angular" => DepthCriterion.Angular, "lstsq" => DepthCriterion.Lstsq,
        _ => throw new LlmSnpException($"--depth-criterion: unknown criterion '{s}' (influence, angular, lstsq)"),
    };

    public static DepthReplace ParseReplace(string s) => s switch
    {
        "none" => DepthReplace.None, "lstsq" => DepthReplace.Lstsq,
        _ => throw new LlmSnpException($"--depth-replace: unknown replacement '{s}' (none, lstsq)"),
    };

    /// <summary>`--drop-blocks N` (a count) or `--drop-blocks i,j,…` (original indices; one entry with a comma: "3,").</summary>
    public static DepthOptions Parse(string dropBlocks, string? criterion, string? replace, double damp)
    {
        var s = dropBlocks.Trim();
        int? count = null;
        List<int>? named = null;
        if (!s.Contains(','))
            count = int.TryParse(s, System.Globalization.NumberStyles.None, null, out var n) ? n
                : throw new LlmSnpException($"--drop-blocks: '{dropBlocks}' is not a block count or a comma-separated list of block indices");
        else
        {
            named = new List<int>();
            foreach (var part in s.Split(',', StringSplitOptions.TrimEntries).Where(p => p.Length > 0))
            {
                if (!int.TryParse(part, System.Globalization.NumberStyles.None, null, out var i))
                    throw new LlmSnpException($"--drop-blocks: '{part}' is not a block index");
                if (named.Contains(i)) throw new LlmSnpException($"--drop-blocks: block {i} is named twice");
                named.Add(i);
            }
            if (named.Count == 0) throw new LlmSnpException("--drop-blocks: the list names no block");
            named.Sort();
        }
        if (count is 0) throw new LlmSnpException("--drop-blocks: 0 blocks; give a count of at least 1 or the block indices");
        return new DepthOptions
        {
            Count = count ?? 0, Named = named,
            Criterion = criterion is null ? DepthCriterion.Angular : ParseCriterion(criterion), CriterionGiven = criterion is not null,
            Replace = replace is null ? DepthReplace.None : ParseReplace(replace), Damp = damp,
        };
    }

    /// <summary>Refuses what cannot be done on a model of <paramref name="blocks"/> blocks.</summary>
    public void CheckAgainst(int blocks)
    {
        if (Named is null && Count < 1) throw new LlmSnpException($"--drop-blocks: {Count} blocks; give a count of at least 1");
        if (Removed >= blocks) throw new LlmSnpException($"--drop-blocks: removing {Removed} of the model's {blocks} blocks would leave none (at most {blocks - 1})");
        if (Named?.FirstOrDefault(i => i >= blocks) is int bad && bad >= blocks)
            throw new LlmSnpException($"--drop-blocks: block {bad} is out of range (the model has blocks 0..{blocks - 1})");
        if (Replace == DepthReplace.Lstsq && Named?.Contains(0) == true)
            throw new LlmSnpException("--drop-blocks: block 0 has no preceding block whose MLP could hold the least-squares replacement (--depth-replace lstsq); drop it with --depth-replace none");
        if (!(Damp >= 0) || double.IsInfinity(Damp)) throw new LlmSnpException($"--damp must be a non-negative number (got {Damp})");
    }
}
