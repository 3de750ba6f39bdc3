using LlmSnp.Models;
using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using static TorchSharp.torch;

namespace LlmSnp.Pruning;

/// <summary>
/// Runs the engine and writes the pruned checkpoint (models.md §4) atomically: everything goes to
/// a temporary sibling directory that is renamed to the output only once weights, config, report
/// and companion files are all written and flushed.
/// </summary>
public static class PrunedCheckpoint
{
    public const string ReportFile = "pruning_config.json";
    public const string PaddedDir = "padded";
    public const string PaddedWithoutExperts = "--export-padded with --experts-keep: a removed expert cannot be padded back (its router row would still draw tokens)";
    static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public sealed record Request
    {
        public required IPrunableModel Model { get; init; }
        public required PruneOptions Options { get; init; }
        public required IReadOnlyList<Tensor> Calibration { get; init; }
        /// <summary>Calibration provenance for the report (source, windows or images).</summary>
        public required JsonObject CalibrationInfo { get; init; }
        public required string OutDir { get; init; }
        public required string SourceDir { get; init; }
        public required long ParamsBefore { get; init; }
        public bool Force { get; init; }
        public bool ExportPadded { get; init; }
        public long ShardBytes { get; init; } = 2L << 30;
        /// <summary>Called with each pruned block once its tensors are written (compare evaluates it in the same pass).</summary>
        public Action<IPrunableBlock, int>? AfterBlockWritten { get; init; }
        /// <summary>Blocks removed first (docs/depth.md); null: every block stays.</summary>
        public Depth.DepthPlan? Depth { get; init; }
        /// <summary>Whether SNP prunes the width of the blocks (false: a depth-only prune writes them whole).</summary>
        public bool PruneWidth { get; init; } = true;
    }

    /// <summary>Prunes and writes; returns the report that was written as pruning_config.json.</summary>
    public static JsonObject Write(Request req, Action<string>? log = null)
    {
        req.Options.Experts?.CheckAgainst(req.Model);
        if (req.ExportPadded && req.Options.Experts is not null)
            throw new LlmSnpException(PaddedWithoutExperts);
        string outDir = Path.GetFullPath(req.OutDir);
        string src = Path.GetFullPath(req.SourceDir);
        if (outDir == src || outDir.StartsWith(src + Path.DirectorySeparatorChar) || src.StartsWith(outDir + Path.DirectorySeparatorChar))
            throw new LlmSnpException($"{req.OutDir}: output directory must not be the model directory or inside it");
        var existing = FileNodes.Kind(outDir);
        if (existing is not (FileNodeKind.Missing or FileNodeKind.Directory))
            throw new LlmSnpException($"{req.OutDir}: is {FileNodes.Describe(existing)}, not a directory; it is not replaced");
        if (existing == FileNodeKind.Directory && !req.Force)
            throw new LlmSnpException($"{req.OutDir}: already exists; pass --force to replace it");
        string parent = Path.GetDirectoryName(outDir)!;
        try { Directory.CreateDirectory(parent); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new LlmSnpException($"{parent}: cannot create the output's parent directory ({e.Message})");
        }
        // .NAME.tmp-PID-ID: stale ones of killed runs are removed first; a signal removes this one (StagingDirectory).
        string tmp;
        try { tmp = StagingDirectory.Create(parent, Path.GetFileName(outDir), log); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new LlmSnpException($"{parent}: cannot write the output here ({e.Message})");
        }
        try
        {
            var report = WriteInto(req, tmp, log);
            Publish(tmp, outDir);
            return report;
        }
        catch (Exception e) when (e is IOException || ResourceLimits.Explain(e) != null)
        {
            TryDelete(tmp);
            throw new LlmSnpException($"{req.OutDir}: writing the pruned checkpoint failed ({ResourceLimits.Explain(e) ?? e.Message}); nothing was written");
        }
        catch
        {
            TryDelete(tmp);
            throw;
        }
        finally { StagingDirectory.Release(tmp); }
    }

    static JsonObject WriteInto(Request req, string dir, Action<string>? log)
    {
        var sw = Stopwatch.StartNew();
        // Depth first: the width pass and the writer see only the kept blocks, renumbered when written.
        var depth = req.Depth is { } plan ? new Depth.DepthPrunedModel(req.Model, plan) : null;
        IPrunableModel model = depth ?? req.Model;
        var dtype = model.StoredDType;
        var hashes = model.SourceHashes();
        long paramsAfter = 0;
        long activeAdjust = 0;   // mixtures: top-k experts (at their mean size) in place of all of them
        JsonObject report;
        using (var writer = new SafeTensorsWriter(dir, req.ShardBytes))
        using (var padded = req.ExportPadded ? new SafeTensorsWriter(Path.Combine(dir, PaddedDir), req.ShardBytes) : null)
        {
            void Add(SafeTensorsWriter w, IEnumerable<(string Name, Tensor Tensor)> ts, bool count)
            {
                foreach (var (n, t) in ts)
                    using (t)
                    {
                        if (!Subspace.AllFinite(t)) throw new LlmSnpException($"{model.ModelDir}: tensor '{n}' would be written with NaN or infinite values (the source holds them, or the fold produced them); nothing was written");
                        if (count) paramsAfter += t.numel();
                        w.Add(n, t);
                    }
            }
            Action<IPrunableBlock, int> write = (block, b) =>
            {
                if (block is IMixtureBlock { ExpertSubBlock: not null } mixture && mixture.ExpertParameters() is { Length: > 0 } experts)
                    activeAdjust += (long)Math.Round((double)experts.Sum() / experts.Length * mixture.TopK) - experts.Sum();
                Add(writer, depth is null ? block.Tensors(dtype) : LayerRenumbering.Rename(block.Tensors(dtype), depth.Original(b), b), true);
                if (padded != null) Add(padded, block.PaddedTensors(dtype), false);
                req.AfterBlockWritten?.Invoke(block, b);
            };
            var result = req.PruneWidth ? new SnpEngine(model, req.Options, log).Run(req.Calibration, write) : Depth.WholeBlocks.Run(model, write, log);
            if (req.Options.WidthMultiple == 1 && Models.ModelFamilies.Of(req.SourceDir).Gguf is not null && result.Layers.Count(l => NodeKinds.IsNeurons(NodeKinds.Parse(l.Kind, "kind")) && l.UnitsKept < l.Units && l.UnitsKept % 16 != 0) is int odd and > 0)
                log?.Invoke($"note: {odd} MLP layers keep a width that is not a multiple of 16; llama.cpp's fast F16/F32 GEMM then takes a slow path for their down_proj (--width-multiple 16 aligns them)");
            Add(writer, model.OuterTensors(dtype), true);
            if (padded != null) Add(padded, model.OuterTensors(dtype), false);
            var files = writer.Finish();
            padded?.Finish();
            double writeSeconds = sw.Elapsed.TotalSeconds - result.StatisticsSeconds - result.DecompositionSeconds - result.PlanSeconds;
            AtomicFile.WriteAllText(Path.Combine(dir, "config.json"), model.PrunedConfig(result.Kept, dtype).ToJsonString(Indented));
            if (padded != null)
                AtomicFile.WriteAllText(Path.Combine(dir, PaddedDir, "config.json"), model.PaddedConfig(result.Kept, dtype).ToJsonString(Indented));
            foreach (var f in model.CompanionFiles())
            {
                File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
                if (padded != null) File.Copy(f, Path.Combine(dir, PaddedDir, Path.GetFileName(f)));
            }
            report = Report(req, result, hashes, paramsAfter, files, writeSeconds, sw.Elapsed.TotalSeconds);
            if (req.Depth is not null) report["depth"] = req.Depth.ToJson();
            if (req.Model is IMixtureModel moe) MixtureReports.AddTo(report, req.Options, result.Mixtures, moe.ActiveParameterCount(), paramsAfter + activeAdjust);
        }
        AtomicFile.WriteAllText(Path.Combine(dir, ReportFile), report.ToJsonString(Indented));
        ModelCard.Write(dir, report, req.SourceDir, req.OutDir);
        return report;
    }

    static JsonObject Report(Request req, PruneResult r, IReadOnlyDictionary<string, string>? hashes, long paramsAfter,
        IReadOnlyList<string> files, double writeSeconds, double totalSeconds)
    {
        var o = req.Options;
        var layers = new JsonArray();
        foreach (var l in r.Layers)
            layers.Add(new JsonObject
            {
                ["name"] = l.Name, ["kind"] = l.Kind, ["units"] = l.Units, ["group_size"] = l.GroupSize,
                ["units_kept"] = l.UnitsKept, ["groups_kept"] = l.UnitsKept / l.GroupSize,
                [l.Kind == NodeKinds.Name(NodeKind.Heads) ? "kept_heads" : "kept_neurons"] = new JsonArray(l.KeptIndices.Select(i => (JsonNode)i).ToArray()),
                ["error"] = l.Error, ["relative_error"] = l.RelativeError,
                ["damping_lambda"] = l.Lambda, ["damping_escalations"] = l.DampingEscalations,
                ["reconstruct_constant"] = l.Constant,
                ["reconstruct_used"] = l.Reconstruct,
                ["params_removed"] = l.ParamsRemoved,
            });
        for (int i = 0; i < r.Layers.Count; i++)
        {
            if (r.Layers[i].BiasFreeBecause is string why) layers[i]!["bias_free_because"] = why;
            if (r.Layers[i].KeptWholeBecause is string whole) layers[i]!["kept_whole_because"] = whole;
        }
        var sourceHashes = new JsonObject();
        string? notStock = req.Model.NotStockLoadable(r.Kept);
        if (hashes != null) foreach (var (k, v) in hashes) sourceHashes[k] = v;
        return new JsonObject
        {
            ["tool"] = "llmsnp",
            ["tool_version"] = typeof(PrunedCheckpoint).Assembly.GetName().Version?.ToString(3),
            ["family"] = req.Model.Family,
            ["source_model"] = Path.GetFileName(Path.GetFullPath(req.SourceDir).TrimEnd(Path.DirectorySeparatorChar)),
            ["source_sha256"] = sourceHashes,
            ["options"] = new JsonObject
            {
                ["ordering"] = Orderings.Name(o.Ordering),
                ["reconstruct"] = ReconstructModes.Name(o.Reconstruct),
                ["policy"] = o.PolicyName,
                [o.PolicyName] = o.Amount,
                ["targets"] = NodeKinds.Describe(o.Targets),
                ["damp"] = o.Damp,
                ["seed"] = o.Seed,
                ["uniform_widths"] = o.UniformWidths,
                ["width_multiple"] = o.WidthMultiple,
                ["width_pruned"] = req.PruneWidth,
                ["dtype_written"] = SafeDTypes.ConfigName(req.Model.StoredDType),
                ["compute_dtype"] = SafeDTypes.ConfigName(req.Model.ComputeDType),
            },
            ["calibration"] = req.CalibrationInfo.DeepClone(),
            ["tau"] = r.Tau,
            ["uniform_kept_groups"] = r.UniformKept is { } u
                ? new JsonObject(u.OrderBy(kv => kv.Key).Select(kv => KeyValuePair.Create(NodeKinds.Name(kv.Key), (JsonNode?)kv.Value)))
                : null,
            // Whether the family's stock transformers class builds exactly the stored shapes from config.json alone.
            ["stock_loadable"] = notStock is null,
            ["stock_loadable_why_not"] = notStock,
            ["params_before"] = req.ParamsBefore,
            ["params_after"] = paramsAfter,
            ["prunable_params"] = r.PrunableParams,
            ["prunable_params_removed"] = r.ParamsRemoved,
            ["prunable_fraction_removed"] = r.PrunableParams > 0 ? (double)r.ParamsRemoved / r.PrunableParams : 0,
            ["requested_budget"] = o.Policy == RatioPolicyKind.Budget ? o.Amount : null,
            ["weight_files"] = new JsonArray(files.Select(f => (JsonNode)f).ToArray()),
            ["layers"] = layers,
            ["seconds"] = new JsonObject
            {
                ["budget_plan"] = r.PlanSeconds, ["statistics"] = r.StatisticsSeconds,
                ["decomposition"] = r.DecompositionSeconds, ["writing"] = writeSeconds, ["total"] = totalSeconds,
            },
        };
    }

    /// <summary>The old output (with --force) is moved aside and the new one renamed in under the staging lock: a signal sees either.</summary>
    static void Publish(string tmp, string outDir)
    {
        string? old = null;
        StagingDirectory.Publish(() =>
        {
            if (FileNodes.Kind(outDir) != FileNodeKind.Missing)
            {
                old = outDir + $".old-{Guid.NewGuid():N}";
                Directory.Move(outDir, old);
            }
            Directory.Move(tmp, outDir);
        });
        if (old != null) TryDelete(old);
    }

    static void TryDelete(string path)
    {
        try
        {
            if (Directory.Exists(path)) Directory.Delete(path, recursive: true);
            else if (File.Exists(path)) File.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }
}
