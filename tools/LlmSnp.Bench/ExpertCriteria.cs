using TorchSharp;
using System.Diagnostics;
using LlmSnp.Checkpoint;
using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Evaluation;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Benchmarks;

public sealed record ExpertCriteriaOptions
{
    /// <summary>A mixture checkpoint with its tokenizer, or null with <see cref="Shape"/>.</summary>
    public string? ModelDir { get; init; }
    /// <summary>A random checkpoint of this shape, written to the work directory and removed after.</summary>
    public IBenchShape? Shape { get; init; }
    /// <summary>Fractions of experts kept.</summary>
    public IReadOnlyList<double> Keep { get; init; } = new[] { 0.5, 0.75 };
    public int CalibSamples { get; init; } = 32;
    public int SeqLen { get; init; } = 128;
    public int EvalWindows { get; init; } = 16;
    /// <summary>Fraction of every kept expert's neurons removed in the few-token comparison.</summary>
    public double Ratio { get; init; } = 0.25;
    public ScalarType DType { get; init; } = ScalarType.Float32;
    public string WorkDir { get; init; } = Path.GetTempPath();
}

/// <summary>
/// `llmsnp bench experts`: which expert-removal criterion and fold keep a mixture closest to itself, and what to do
/// with experts that see few calibration tokens. Calibration on TinyStories' calibration part; every number is measured
/// on held-out TinyStories windows against the unpruned model: per sparse layer the relative error of the mixture's
/// output on the dense model's own stream (‖y' − y‖² / ‖y‖²), and end to end the mean KL(dense ‖ pruned) per token,
/// top-1 agreement and perplexity.
/// </summary>
public static class ExpertCriteria
{
    public static JsonObject Run(ExpertCriteriaOptions o, Action<string>? log)
    {
        if ((o.ModelDir is null) == (o.Shape is null)) throw new LlmSnpException("bench experts: give --model DIR or --shape NAME");
        if (o.Shape is null) return Measure(o, log);
        if (o.Shape is not MoeShape) throw new LlmSnpException($"--shape {o.Shape.Name}: not a mixture shape");
        string dir = Path.Combine(o.WorkDir, $"llmsnp-experts-{o.Shape.Name}-{Guid.NewGuid():N}");
        StagingDirectory.Track(dir);
        try
        {
            o.Shape.WriteRandom(dir, o.Shape.DiskDType, seed: 0);
            var r = Measure(o with { ModelDir = dir }, log);
            r["model"] = $"random {o.Shape.Name} (BF16, seed 0)";
            r["shape"] = o.Shape.Describe();
            return r;
        }
        finally
        {
            if (Directory.Exists(dir)) Directory.Delete(dir, true);
            StagingDirectory.Release(dir);
        }
    }

    static JsonObject Measure(ExpertCriteriaOptions o, Action<string>? log)
    {
        var sw = Stopwatch.StartNew();
        string modelDir = o.ModelDir!;
        using var dense = ModelFamilies.OpenLanguageModel(modelDir, CPU, o.DType, "bench experts");
        if (dense is not IMixtureModel moe || moe.Experts == 0) throw new LlmSnpException($"{modelDir}: bench experts needs a mixture (mixtral, qwen3_moe)");
        var tok = dense.Tokenizer();
        var calib = CalibrationSet.Sample(tok, TextSources.TinyStories, o.CalibSamples, o.SeqLen, 0);
        var calibBatches = Enumerable.Range(0, o.CalibSamples).Select(i => calib.Ids.narrow(0, i, 1)).ToList();
        var evalIds = PerplexityJob.Tokenize(dense, TextSources.TinyStories, null);
        var windows = Enumerable.Range(0, o.EvalWindows).Select(w => evalIds.Skip(w * o.SeqLen).Take(o.SeqLen).Select(x => (long)x).ToArray()).ToList();
        log?.Invoke($"dense reference on {windows.Count} held-out windows of {o.SeqLen}");
        var reference = Reference.Of(dense, windows);
        double densePpl = reference.Perplexity();
        var runs = new JsonArray();
        string work = Path.Combine(o.WorkDir, $"llmsnp-experts-{Guid.NewGuid():N}");
        StagingDirectory.Track(work);
        try
        {
            void Measure(string what, PruneOptions options, JsonObject describe)
            {
                string outDir = Path.Combine(work, $"run{runs.Count}");
                var rsw = Stopwatch.StartNew();
                JsonObject report;
                using (var model = ModelFamilies.OpenLanguageModel(modelDir, CPU, o.DType))
                    report = PrunedCheckpoint.Write(new PrunedCheckpoint.Request
                    {
                        Model = model, Options = options, Calibration = calibBatches, CalibrationInfo = new JsonObject { ["source"] = TextSources.TinyStories },
                        OutDir = outDir, SourceDir = modelDir, ParamsBefore = model.ParameterCount(),
                    });
                using var pruned = ModelFamilies.OpenLanguageModel(outDir, CPU, o.DType);
                var heldOut = reference.Compare(pruned);
                describe["what"] = what;
                describe["calibration_relative_error_folded"] = Mean(report, "relative_error_folded");
                describe["calibration_relative_error_removed"] = Mean(report, "relative_error_removed");
                describe["heldout"] = heldOut;
                describe["params_after"] = report["params_after"]!.DeepClone();
                describe["active_params_after"] = report["active_params_after"]!.DeepClone();
                describe["few_token_experts"] = report["experts"]!.AsArray().Sum(l => l!["few_tokens"]!.AsArray().Count);
                describe["seconds"] = rsw.Elapsed.TotalSeconds;
                runs.Add(describe);
                log?.Invoke($"{what}: held-out layer error {heldOut["mean_layer_relative_error"]}, KL {heldOut["kl_per_token"]}, top-1 {heldOut["top1_agreement"]}");
                Directory.Delete(outDir, true);
            }
            var onlyExperts = new HashSet<NodeKind> { NodeKind.Expert };
            foreach (double keep in o.Keep)
                foreach (var criterion in ExpertOptions.Criteria.Values)
                    foreach (var fold in ExpertOptions.Folds.Values)
                        Measure($"keep {keep} {ExpertOptions.Name(criterion)} fold {ExpertOptions.Name(fold)}",
                            // Nothing pruned inside the experts: the cheapest ordering (no eigendecomposition) keeps them whole.
                            new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0, Ordering = Ordering.Variance, Targets = onlyExperts, Experts = new ExpertOptions { KeepFraction = keep, Criterion = criterion, Fold = fold } },
                            new JsonObject { ["experiment"] = "expert removal", ["keep"] = keep, ["criterion"] = ExpertOptions.Name(criterion), ["fold"] = ExpertOptions.Name(fold) });
            // Few tokens: the same neuron ratio inside every expert, calibrated on one window (most experts then see fewer tokens
            // than they have neurons) and on the full calibration, each expert with few tokens pruned on its damped Gram or kept whole.
            foreach (var (calibration, label) in new[] { (calibBatches.Take(1).ToList(), "one window"), (calibBatches, "full") })
                foreach (var policy in new[] { FewTokenPolicy.Damp, FewTokenPolicy.KeepWhole })
                {
                    var saved = calibBatches;
                    calibBatches = calibration;
                    Measure($"neurons {o.Ratio} few-tokens {(policy == FewTokenPolicy.Damp ? "damp" : "keep")} calibration {label}",
                        new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = o.Ratio, Targets = onlyExperts, FewTokenExperts = policy },
                        new JsonObject { ["experiment"] = "few tokens", ["ratio"] = o.Ratio, ["policy"] = policy == FewTokenPolicy.Damp ? "damp" : "keep", ["calibration_windows"] = calibration.Count });
                    calibBatches = saved;
                }
        }
        finally
        {
            if (Directory.Exists(work)) Directory.Delete(work, true);
            StagingDirectory.Release(work);
            reference.Dispose();
            calib.Ids.Dispose();
        }
        return new JsonObject
        {
            ["model"] = Path.GetFileName(Path.GetFullPath(modelDir).TrimEnd('/')), ["family"] = dense.Family, ["experts"] = moe.Experts, ["top_k"] = moe.TopK,
            ["calibration"] = $"{o.CalibSamples} TinyStories calibration windows × {o.SeqLen}", ["heldout"] = $"{windows.Count} TinyStories evaluation windows × {o.SeqLen}",
            ["dtype"] = o.DType.ToString(), ["dense_heldout_perplexity"] = densePpl, ["runs"] = runs, ["seconds"] = sw.Elapsed.TotalSeconds,
        };
    }

    static double Mean(JsonObject report, string key) => report["experts"]!.AsArray().Average(l => (double?)l![key] ?? 0);

    /// <summary>The dense model on the held-out windows: per sparse layer the stream entering its mixture and the mixture's output, and the log-probabilities.</summary>
    sealed class Reference : IDisposable
    {
        readonly List<long[]> _windows;
        readonly Dictionary<int, (List<Tensor> In, List<Tensor> Out)> _layers = new();
        readonly List<Tensor> _logp = new();

        Reference(List<long[]> windows) => _windows = windows;

        public static Reference Of(ILanguageModel m, List<long[]> windows)
        {
            var r = new Reference(windows);
            var h = windows.Select(w => m.Embed(torch.tensor(w, new long[] { 1, w.Length }))).ToList();
            for (int i = 0; i < m.BlockCount; i++)
            {
                using var b = m.LoadBlock(i);
                for (int k = 0; k < h.Count; k++)
                {
                    using var scope = NewDisposeScope();
                    Tensor next;
                    if (b is IMixtureBlock { ExpertSubBlock: int s })
                    {
                        var a = b.Advance(0, h[k]);
                        next = b.Advance(s, a);
                        if (!r._layers.TryGetValue(i, out var l)) r._layers[i] = l = (new List<Tensor>(), new List<Tensor>());
                        l.In.Add(a.DetachFromDisposeScope());
                        l.Out.Add((next - a).DetachFromDisposeScope());
                    }
                    else next = b.Forward(h[k])!;
                    h[k].Dispose();
                    h[k] = next.DetachFromDisposeScope();
                }
            }
            foreach (var x in h)
            {
                using var scope = NewDisposeScope();
                r._logp.Add(F.log_softmax(m.Head(x).to(ScalarType.Float32), -1).DetachFromDisposeScope());
                x.Dispose();
            }
            return r;
        }

        /// <summary>The dense model's held-out perplexity (next-token NLL over every window).</summary>
        public double Perplexity()
        {
            double nll = 0;
            long n = 0;
            for (int k = 0; k < _windows.Count; k++)
            {
                using var scope = NewDisposeScope();
                var w = _windows[k];
                nll -= _logp[k].narrow(1, 0, w.Length - 1).gather(2, torch.tensor(w.Skip(1).ToArray()).reshape(1, -1, 1)).sum(type: ScalarType.Float64).item<double>();
                n += w.Length - 1;
            }
            return Math.Exp(nll / n);
        }

        /// <summary>A pruned model (same attention) against the dense one.</summary>
        public JsonObject Compare(ILanguageModel m)
        {
            var layerErrors = new JsonArray();
            double sum = 0;
            foreach (var (i, l) in _layers.OrderBy(kv => kv.Key))
            {
                using var b = m.LoadBlock(i);
                int s = ((IMixtureBlock)b).ExpertSubBlock!.Value;
                double err = 0, energy = 0;
                for (int k = 0; k < l.In.Count; k++)
                {
                    using var scope = NewDisposeScope();
                    var y = b.Advance(s, l.In[k]) - l.In[k];
                    err += (y - l.Out[k]).square().sum(type: ScalarType.Float64).item<double>();
                    energy += l.Out[k].square().sum(type: ScalarType.Float64).item<double>();
                }
                layerErrors.Add(err / energy);
                sum += err / energy;
            }
            double kl = 0, nll = 0;
            long agree = 0, tokens = 0;
            for (int k = 0; k < _windows.Count; k++)
            {
                using var scope = NewDisposeScope();
                var w = _windows[k];
                var lq = F.log_softmax(Forward(m, w).to(ScalarType.Float32), -1);
                var lp = _logp[k];
                kl += (lp.exp() * (lp - lq)).sum(type: ScalarType.Float64).item<double>();
                agree += lp.argmax(-1).eq(lq.argmax(-1)).sum().item<long>();
                var target = torch.tensor(w.Skip(1).ToArray()).reshape(1, -1, 1);
                nll -= lq.narrow(1, 0, w.Length - 1).gather(2, target).sum(type: ScalarType.Float64).item<double>();
                tokens += w.Length;
            }
            return new JsonObject
            {
                ["mean_layer_relative_error"] = sum / Math.Max(1, layerErrors.Count), ["layer_relative_errors"] = layerErrors,
                ["kl_per_token"] = kl / tokens, ["top1_agreement"] = (double)agree / tokens,
                ["perplexity"] = Math.Exp(nll / (tokens - _windows.Count)),
            };
        }

        static Tensor Forward(ILanguageModel m, long[] ids)
        {
            var h = m.Embed(torch.tensor(ids, new long[] { 1, ids.Length }));
            for (int i = 0; i < m.BlockCount; i++)
                using (var b = m.LoadBlock(i))
                {
                    var next = b.Forward(h)!;
                    h.Dispose();
                    h = next;
                }
            var logits = m.Head(h);
            h.Dispose();
            return logits;
        }

        public void Dispose()
        {
            foreach (var (a, b) in _layers.Values) { a.ForEach(t => t.Dispose()); b.ForEach(t => t.Dispose()); }
            _logp.ForEach(t => t.Dispose());
        }
    }
}
