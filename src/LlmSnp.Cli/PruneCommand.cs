using System.CommandLine;
using LlmSnp;
using LlmSnp.Models;
using LlmSnp.Pruning;

/// <summary>`llmsnp prune`: SNP (or a baseline) on a checkpoint, written atomically, optionally measured dense and pruned.</summary>
static class PruneCommand
{
    public static Command Build()
    {
        var model = Cli.ModelOption();
        var o = new PruneCliOptions();
        var cmd = new Command("prune", "prune a checkpoint with SNP (or a baseline ordering) and write it") { model };
        o.AddTo(cmd);
        cmd.Options.Add(Cli.Device); cmd.Options.Add(Cli.DType); cmd.Options.Add(Cli.Json);
        cmd.SetAction(p => Cli.Run(p, () => PruneJob.Run(o.ToJobOptions(p, p.GetValue(model)!, Cli.ComputeDevice(p), Cli.ComputeDType(p)), Cli.Log).ToJson()));
        return cmd;
    }
}

/// <summary>The options `prune` (and `demo`) share.</summary>
sealed class PruneCliOptions
{
    public static Option<int> WidthMultipleOption() => new("--width-multiple")
    {
        Description = "every pruned MLP layer keeps a multiple of N neurons (16 lets llama.cpp's fast F16/F32 GEMM run the down_proj on AVX-512 CPUs)",
        DefaultValueFactory = _ => 1,
    };

    readonly Option<string> _out = new("--out") { Description = "output directory (written atomically)", Required = true };
    readonly Option<string> _ordering = new("--ordering") { Description = "zca, zca-precision, id, obs, variance, weight-norm, fluctuation, wanda-sp, magnitude, random", DefaultValueFactory = _ => "zca" };
    readonly Option<string> _reconstruct = new("--reconstruct") { Description = "lstsq (least squares, with the mean term wherever the consumer has a bias or its stock class can hold one; else without), lstsq-nobias, lstsq-bias, bias (means only, FLAP) or none", DefaultValueFactory = _ => "lstsq" };
    readonly Option<double?> _ratio = new("--ratio") { Description = "uniform fraction of units removed per layer" };
    readonly Option<double?> _variance = new("--variance") { Description = "τ: keep the smallest prefix holding this fraction of residual variance (automatic per-layer ratios)" };
    readonly Option<double?> _budget = new("--budget") { Description = "fraction of prunable parameters to remove (τ found by bisection)" };
    readonly Option<bool> _uniform = new("--uniform") { Description = "with --ratio or --budget: the same kept count per node kind in every layer, so the stock config states the pruned widths" };
    readonly Option<string> _targets = new("--targets") { Description = "mlp, heads or mlp,heads", DefaultValueFactory = _ => "mlp,heads" };
    readonly Option<int> _widthMultiple = WidthMultipleOption();
    readonly Option<string> _calib = new("--calib") { Description = "calibration data: c4 (bundled sample), wikitext2, tinystories (bundled calibration part) or a text file; a labelled image folder for image models", DefaultValueFactory = _ => "c4" };
    readonly Option<int> _samples = new("--calib-samples") { Description = "calibration windows (text) or images", DefaultValueFactory = _ => 128 };
    readonly Option<int?> _calibLen = new("--calib-seqlen") { Description = "calibration window length (default: 2048 or max positions)" };
    readonly Option<int> _seed = new("--seed") { Description = "seed for calibration sampling and the random ordering", DefaultValueFactory = _ => 0 };
    readonly Option<double> _damp = new("--damp") { Description = "damping, relative to the mean unit diagonal of G", DefaultValueFactory = _ => 0.01 };
    readonly Option<string?> _eval = new("--eval") { Description = "measure dense and pruned: perplexity on wikitext2, c4, tinystories or a text file; zero-shot accuracy with tasks:piqa,arc_easy,… (see eval tasks); 'accuracy' (with --images) for image models" };
    readonly Option<int?> _evalLen = new("--eval-seqlen") { Description = "evaluation window length" };
    readonly Option<int?> _evalWindows = new("--eval-limit", "--eval-max-windows") { Description = "evaluate only the first N windows (text), documents of each task, or images" };
    readonly Option<string?> _images = new("--images") { Description = "labelled image folder for --eval accuracy (image models)" };
    readonly Option<bool> _padded = new("--export-padded") { Description = "also write a zero-padded copy with the original shapes (OUT/padded) that stock tools load" };
    readonly Option<bool> _force = new("--force") { Description = "replace an existing output directory" };
    readonly ExpertCliOptions _experts = new();
    readonly Option<string?> _dropBlocks = new("--drop-blocks") { Description = "depth: remove N whole blocks (chosen by --depth-criterion) or the blocks i,j,… (original indices; one block: 'i,'), before any width pruning" };
    readonly Option<string?> _depthCriterion = new("--depth-criterion") { Description = "which blocks --drop-blocks N removes: influence (1 - cos of a block's input and output, lowest blocks), angular (the span of N consecutive blocks with the smallest angle between its input and output), lstsq (the span whose least-squares replacement leaves the smallest residual); default angular" };
    readonly Option<string?> _depthReplace = new("--depth-replace") { Description = "how removed blocks are replaced: none (dropped) or lstsq (a linear map over the hidden size fitted on the calibration set, folded into the preceding block's MLP output projection); default none" };

    public void AddTo(Command c)
    {
        foreach (var o in new Option[] { _out, _ordering, _reconstruct, _ratio, _variance, _budget, _uniform, _widthMultiple, _targets, _calib, _samples, _calibLen, _seed, _damp, _eval, _evalLen, _evalWindows, _images, _padded, _force })
            c.Options.Add(o);
        _experts.AddTo(c);
        foreach (var o in new Option[] { _dropBlocks, _depthCriterion, _depthReplace }) c.Options.Add(o);
    }

    public PruneJobOptions ToJobOptions(ParseResult p, string modelDir, TorchSharp.torch.Device device, TorchSharp.torch.ScalarType dtype)
    {
        var policies = new (double? Value, RatioPolicyKind Kind)[] { (p.GetValue(_ratio), RatioPolicyKind.Ratio), (p.GetValue(_variance), RatioPolicyKind.Variance), (p.GetValue(_budget), RatioPolicyKind.Budget) }
            .Where(x => x.Value != null).ToList();
        if (policies.Count > 1) throw new LlmSnpException("give only one of --ratio, --variance, --budget");
        string? drop = p.GetValue(_dropBlocks);
        if (drop is null && (p.GetValue(_depthCriterion) is not null || p.GetValue(_depthReplace) is not null))
            throw new LlmSnpException($"{(p.GetValue(_depthCriterion) is not null ? "--depth-criterion" : "--depth-replace")} needs --drop-blocks");
        var depth = drop is null ? null : LlmSnp.Pruning.Depth.DepthOptions.Parse(drop, p.GetValue(_depthCriterion), p.GetValue(_depthReplace), p.GetValue(_damp));
        var (amount, kind) = policies.Count == 1 ? (policies[0].Value!.Value, policies[0].Kind) : (0.99, RatioPolicyKind.Variance);
        var targets = NodeKinds.ParseSet(p.GetValue(_targets)!, "--targets");
        var reconstruct = ReconstructModes.Parse(p.GetValue(_reconstruct)!);
        return new PruneJobOptions
        {
            ModelDir = modelDir, OutDir = p.GetValue(_out)!,
            Prune = new PruneOptions
            {
                Ordering = Orderings.Parse(p.GetValue(_ordering)!), Reconstruct = reconstruct, Policy = kind, Amount = amount,
                Targets = targets, Damp = p.GetValue(_damp), Seed = p.GetValue(_seed),
                UniformWidths = p.GetValue(_uniform), WidthMultiple = p.GetValue(_widthMultiple),
                Experts = _experts.Parse(p), FewTokenExperts = _experts.FewTokens(p),
            },
            CalibSource = p.GetValue(_calib)!, CalibSamples = p.GetValue(_samples), CalibSeqLen = p.GetValue(_calibLen),
            EvalDataset = p.GetValue(_eval), EvalSeqLen = p.GetValue(_evalLen), EvalLimit = p.GetValue(_evalWindows), EvalImages = p.GetValue(_images),
            Force = p.GetValue(_force), ExportPadded = p.GetValue(_padded), Device = device, DType = dtype,
            // --drop-blocks alone removes blocks only; with a width policy, SNP then prunes the blocks that remain.
            Depth = depth, PruneWidth = depth is null || policies.Count == 1,
        };
    }
}

/// <summary>The mixture options of `prune`: expert removal and experts with few calibration tokens.</summary>
sealed class ExpertCliOptions
{
    readonly Option<string?> _keep = new("--experts-keep") { Description = "mixtures: experts every sparse layer keeps, a count (at least num_experts_per_tok) or a fraction in (0, 1)" };
    readonly Option<string?> _criterion = new("--experts-criterion") { Description = "how the kept experts are chosen: snp (least-squares contribution), reap (router weight × output norm), frequency (default snp)" };
    readonly Option<string?> _fold = new("--experts-fold") { Description = "scale (kept experts' down_proj scaled by least squares to restore the layer's output) or none (default scale)" };
    readonly Option<string> _few = new("--experts-few-tokens") { Description = "experts with fewer calibration tokens than neurons: damp (pruned on the damped Gram) or keep (kept whole; not with --uniform)", DefaultValueFactory = _ => "damp" };

    public void AddTo(Command c)
    {
        foreach (var o in new Option[] { _keep, _criterion, _fold, _few }) c.Options.Add(o);
    }

    public ExpertOptions? Parse(ParseResult p)
    {
        string? keep = p.GetValue(_keep), criterion = p.GetValue(_criterion), fold = p.GetValue(_fold);
        if (keep is null)
        {
            if (criterion is not null || fold is not null) throw new LlmSnpException($"{(criterion is not null ? "--experts-criterion" : "--experts-fold")} needs --experts-keep (how many experts each sparse layer keeps)");
            return null;
        }
        return ExpertOptions.Parse(keep, criterion ?? "snp", fold ?? "scale");
    }

    public FewTokenPolicy FewTokens(ParseResult p) => p.GetValue(_few) switch
    {
        "damp" => FewTokenPolicy.Damp,
        "keep" => FewTokenPolicy.KeepWhole,
        var x => throw new LlmSnpException($"--experts-few-tokens: unknown policy '{x}' (damp, keep)"),
    };
}
