using LlmSnp.Models;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Evaluation;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Reporting;

/// <summary>One pruning method of a comparison: an ordering, a reconstruction and a ratio policy.</summary>
public sealed record Method(string Label, Ordering Ordering, ReconstructMode Reconstruct, RatioPolicyKind Policy)
{
    /// <summary>The default line-up: SNP with lstsq, FLAP-style, data-free and random baselines, and SNP's own automatic ratios at the same budgets.</summary>
    public static IReadOnlyList<Method> Defaults { get; } = new[]
    {
        new Method("zca (SNP)", Ordering.Zca, ReconstructMode.Lstsq, RatioPolicyKind.Ratio),
        new Method("zca-precision (SNP)", Ordering.ZcaPrecision, ReconstructMode.Lstsq, RatioPolicyKind.Ratio),
        new Method("obs (SNP)", Ordering.Obs, ReconstructMode.Lstsq, RatioPolicyKind.Ratio),
        new Method("id (SNP)", Ordering.Id, ReconstructMode.Lstsq, RatioPolicyKind.Ratio),
        new Method("zca + variance policy (SNP)", Ordering.Zca, ReconstructMode.Lstsq, RatioPolicyKind.Budget),
        new Method("fluctuation + bias (FLAP)", Ordering.Fluctuation, ReconstructMode.Bias, RatioPolicyKind.Ratio),
        new Method("wanda-sp", Ordering.WandaSp, ReconstructMode.None, RatioPolicyKind.Ratio),
        new Method("magnitude", Ordering.Magnitude, ReconstructMode.None, RatioPolicyKind.Ratio),
        new Method("random", Ordering.Random, ReconstructMode.None, RatioPolicyKind.Ratio),
    };

    /// <summary>Parses "ordering[:reconstruct[:policy]]", e.g. "zca:lstsq", "fluctuation:bias", "zca:lstsq:variance"; errors name <paramref name="option"/>.</summary>
    public static Method Parse(string s, string option = "--methods")
    {
        var p = s.Split(':');
        if (p.Length > 3) throw new LlmSnpException($"{option}: '{s}' has {p.Length} fields; a method is ordering[:reconstruct[:ratio|variance]]");
        var ordering = Orderings.Parse(p[0], option);
        var rec = p.Length > 1 ? ReconstructModes.Parse(p[1], option) : Orderings.IsSnp(ordering) ? ReconstructMode.Lstsq : ordering == Ordering.Fluctuation ? ReconstructMode.Bias : ReconstructMode.None;
        var policy = p.Length > 2 ? p[2] switch
        {
            "ratio" => RatioPolicyKind.Ratio, "variance" or "budget" => RatioPolicyKind.Budget,
            _ => throw new LlmSnpException($"{option}: unknown policy '{p[2]}' in '{s}' (ratio, variance)"),
        } : RatioPolicyKind.Ratio;
        return new Method(s, ordering, rec, policy);
    }
}

/// <summary>One pruned model of a comparison; the speed-ups (pruned over dense, same run) are null when speed is not measured.</summary>
public sealed record ComparisonRow(string Targets, string Method, string Ordering, string Reconstruct, string Policy,
    double Ratio, double FractionRemoved, long ParamsAfter, double Metric, double Seconds)
{
    public double? FlopRatio { get; init; }
    public double? PrefillSpeedup { get; init; }
    public double? DecodeSpeedup { get; init; }
    public double? LlamaCppPrefillSpeedup { get; init; }
    public double? LlamaCppDecodeSpeedup { get; init; }
    /// <summary>The metric's parts (per task accuracy, %), where it has them.</summary>
    [System.Text.Json.Serialization.JsonIgnore(Condition = System.Text.Json.Serialization.JsonIgnoreCondition.WhenWritingNull)]
    public IReadOnlyDictionary<string, double>? Breakdown { get; init; }

    public ComparisonRow WithSpeed(SpeedUp s) => this with
    {
        FlopRatio = s.FlopRatio, PrefillSpeedup = s.PrefillSpeedUp, DecodeSpeedup = s.DecodeSpeedUp,
        LlamaCppPrefillSpeedup = s.LlamaCppPrefillSpeedUp, LlamaCppDecodeSpeedup = s.LlamaCppDecodeSpeedUp,
    };
}

/// <summary>
/// `llmsnp compare`: every method at every ratio, on one calibration set, each pruned model
/// evaluated in the same streamed pass that prunes it; dense evaluated once.
/// </summary>
public static class Comparison
{
    public sealed record Request
    {
        public required Func<IPrunableModel> OpenModel { get; init; }
        public required IReadOnlyList<Tensor> Calibration { get; init; }
        public required IStreamedMetric Metric { get; init; }
        public required IReadOnlyList<Method> Methods { get; init; }
        public required IReadOnlyList<double> Ratios { get; init; }
        public required IReadOnlyList<string> TargetSets { get; init; }
        public required long ParamsBefore { get; init; }
        public double Damp { get; init; } = 0.01;
        public int Seed { get; init; }
        public int WidthMultiple { get; init; } = 1;
        /// <summary>
        /// The model's speed from a checkpoint directory; with it, every pruned model is timed as the file a user would load.
        /// </summary>
        public Func<string, ModelSpeed>? MeasureSpeed { get; init; }
        /// <summary>The checkpoint directory <see cref="OpenModel"/> reads.</summary>
        public required string SourceDir { get; init; }
    }

    public sealed record Result(double Dense, List<ComparisonRow> Rows, ModelSpeed? DenseSpeed)
    {
        /// <summary>The dense model's metric parts (per task accuracy), where the metric has them.</summary>
        public IReadOnlyDictionary<string, double>? DenseBreakdown { get; init; }
    }

    public static Result Run(Request req, Action<string>? log)
    {
        double dense;
        using (var m = req.OpenModel()) dense = StreamedMetrics.Dense(m, req.Metric);
        var denseBreakdown = Parts(req.Metric);
        log?.Invoke($"dense {req.Metric.Name}: {dense:F3}");
        ModelSpeed? denseSpeed = null;
        if (req.MeasureSpeed != null) denseSpeed = req.MeasureSpeed(req.SourceDir);
        var rows = new List<ComparisonRow>();
        foreach (var targets in req.TargetSets)
            foreach (var method in req.Methods)
                foreach (var ratio in req.Ratios.Where(r => r > 0))
                {
                    var sw = Stopwatch.StartNew();
                    var opt = new PruneOptions
                    {
                        Ordering = method.Ordering, Reconstruct = method.Reconstruct, Policy = method.Policy, Amount = ratio,
                        Targets = NodeKinds.ParseSet(targets, "--targets"), Damp = req.Damp, Seed = req.Seed, WidthMultiple = req.WidthMultiple,
                    };
                    using var model = req.OpenModel();
                    var hidden = req.Metric.Embed(model);
                    // Written (to a temporary directory, removed after) so that each row counts the parameters of the file a
                    // user would get (a Llama consumer may gain a bias) and can be timed as that file.
                    string written = Path.Combine(Path.GetTempPath(), $"llmsnp-compare-{Guid.NewGuid():N}");
                    StagingDirectory.Track(written);   // removed after the row, or by a signal
                    ComparisonRow row;
                    double metric, frac;
                    string speedNote = "";
                    try
                    {
                        var report = PrunedCheckpoint.Write(new PrunedCheckpoint.Request   // publishes only once complete
                        {
                            Model = model, Options = opt, Calibration = req.Calibration, CalibrationInfo = new JsonObject { ["source"] = "compare" },
                            OutDir = written, SourceDir = req.SourceDir, ParamsBefore = req.ParamsBefore,
                            AfterBlockWritten = (block, _) => req.Metric.Advance(block, hidden),
                        });
                        long prunable = (long)report["prunable_params"]!, removed = (long)report["prunable_params_removed"]!;
                        metric = req.Metric.Finish(model, hidden);
                        frac = prunable > 0 ? (double)removed / prunable : 0;
                        row = new ComparisonRow(targets, method.Label, Orderings.Name(method.Ordering), ReconstructModes.Name(method.Reconstruct),
                            method.Policy == RatioPolicyKind.Budget ? "variance" : "ratio", ratio, frac, (long)report["params_after"]!, metric, sw.Elapsed.TotalSeconds)
                            { Breakdown = Parts(req.Metric) };
                        if (denseSpeed != null)
                        {
                            var speed = new SpeedUp(denseSpeed, req.MeasureSpeed!(written), FlopRatio: (double)prunable / Math.Max(1, prunable - removed));
                            row = row.WithSpeed(speed);
                            speedNote = $", prefill {speed.PrefillSpeedUp:F2}×, decode {speed.DecodeSpeedUp:F2}×";
                        }
                    }
                    finally
                    {
                        if (Directory.Exists(written)) Directory.Delete(written, recursive: true);
                        StagingDirectory.Release(written);
                    }
                    rows.Add(row);
                    log?.Invoke($"{targets,-9} {method.Label,-30} r={ratio:F2} removed {frac:P1}: {req.Metric.Name} {metric:F3}{speedNote} ({sw.Elapsed.TotalSeconds:F1}s)");
                }
        return new Result(dense, rows, denseSpeed) { DenseBreakdown = denseBreakdown };
    }

    static IReadOnlyDictionary<string, double>? Parts(IStreamedMetric metric) =>
        metric.Breakdown.Count == 0 ? null : metric.Breakdown.ToDictionary(p => p.Name, p => p.Value);

    /// <summary>Writes comparison.json, comparison.csv and one PNG per target set into <paramref name="dir"/>.</summary>
    public static JsonObject Write(string dir, string title, string metricName, bool higherIsBetter, Result result, JsonObject provenance)
    {
        var (dense, rows) = (result.Dense, result.Rows);
        Directory.CreateDirectory(dir);
        var ci = CultureInfo.InvariantCulture;
        // A metric with parts (tasks) adds a column per part after the fixed ones; `metric` is then their mean.
        var parts = result.DenseBreakdown?.Keys.ToList() ?? new List<string>();
        string Parts(IReadOnlyDictionary<string, double>? b) => string.Concat(parts.Select(p => b != null && b.TryGetValue(p, out var v) ? "," + v.ToString("R", ci) : ","));
        var csv = new StringBuilder("targets,method,ordering,reconstruct,policy,ratio,fraction_removed,params_after,metric,seconds,"
            + "flop_ratio,prefill_speedup,decode_speedup,llama_cpp_prefill_speedup,llama_cpp_decode_speedup" + string.Concat(parts.Select(p => "," + p)) + "\n");
        csv.Append(string.Create(ci, $"dense,dense,,,,0,0,{provenance["params_before"]},{dense},,,,,,{Parts(result.DenseBreakdown)}\n"));
        static string F(double? x) => x is double v ? v.ToString("F4", CultureInfo.InvariantCulture) : "";
        foreach (var r in rows)
            csv.Append(string.Create(ci, $"{r.Targets.Replace(',', '+')},\"{r.Method}\",{r.Ordering},{r.Reconstruct},{r.Policy},{r.Ratio},{r.FractionRemoved:F6},{r.ParamsAfter},{r.Metric},{r.Seconds:F2},"
                + $"{F(r.FlopRatio)},{F(r.PrefillSpeedup)},{F(r.DecodeSpeedup)},{F(r.LlamaCppPrefillSpeedup)},{F(r.LlamaCppDecodeSpeedup)}{Parts(r.Breakdown)}\n"));
        AtomicFile.WriteAllText(Path.Combine(dir, "comparison.csv"), csv.ToString());
        var plots = new JsonArray();
        foreach (var targets in rows.Select(r => r.Targets).Distinct())
        {
            string png = $"comparison-{targets.Replace(',', '+')}.png";
            Plots.MetricVsRemoved(Path.Combine(dir, png), $"{title} — pruning {targets.Replace(",", " + ")}", metricName, higherIsBetter, dense,
                rows.Where(r => r.Targets == targets).GroupBy(r => r.Method).Select(g => (g.Key, g.Select(r => (r.FractionRemoved, r.Metric)).ToList())).ToList());
            plots.Add(png);
        }
        var json = new JsonObject
        {
            ["title"] = title, ["metric"] = metricName, ["dense"] = dense, ["provenance"] = provenance.DeepClone(), ["plots"] = plots,
            ["dense_speed"] = result.DenseSpeed?.ToJson(),
            ["dense_breakdown"] = result.DenseBreakdown is { } db ? new JsonObject(db.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))) : null,
            ["rows"] = JsonSerializer.SerializeToNode(rows, new JsonSerializerOptions { PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower }),
        };
        AtomicFile.WriteAllText(Path.Combine(dir, "comparison.json"), json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        return json;
    }
}
