using TorchSharp;
using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Benchmarks;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Reliability;

/// <summary>
/// What a fuzzing run found. <see cref="Crashes"/> counts cases that ended in anything other than a
/// successful load or an <see cref="LlmSnpException"/>; <see cref="CrashExamples"/> holds the first 20.
/// </summary>
public sealed record FuzzReport(int Cases, int Loaded, int CleanErrors, int Crashes, int Hangs, IReadOnlyList<string> CrashExamples, double Seconds)
{
    public int Seed { get; init; }
    public double PerCaseLimitSeconds { get; init; }
    /// <summary>Clean errors whose message does not name the file (or checkpoint directory) at fault, or spans several lines.</summary>
    public int CleanErrorsWithoutPath { get; init; }
    public IReadOnlyList<string> UnnamedErrorExamples { get; init; } = Array.Empty<string>();
    public IReadOnlyList<string> HangExamples { get; init; } = Array.Empty<string>();
    /// <summary>Cases that allocated more than <see cref="HeaderFuzzer.MemoryLimitBytes"/> (managed, or working-set growth).</summary>
    public IReadOnlyList<string> MemoryFindings { get; init; } = Array.Empty<string>();
    /// <summary>Growth of the process's peak working set over the whole run.</summary>
    public long PeakWorkingSetGrowthBytes { get; init; }
    /// <summary>The most managed memory one case allocated (on its own thread).</summary>
    public long MaxCaseAllocatedBytes { get; init; }
    public string MaxCaseAllocatedExample { get; init; } = "";
    /// <summary>Crash signatures (exception type @ target/mutation) and how often each occurred.</summary>
    public IReadOnlyDictionary<string, int> CrashSignatures { get; init; } = new Dictionary<string, int>();
    /// <summary>Crash kinds ("Type: first sentence of the message") and how often each occurred.</summary>
    public IReadOnlyDictionary<string, int> CrashKinds { get; init; } = new Dictionary<string, int>();
    /// <summary>target → [cases, loaded, clean errors, crashes, hangs].</summary>
    public IReadOnlyDictionary<string, int[]> ByTarget { get; init; } = new Dictionary<string, int[]>();
    /// <summary>target/mutation → [cases, loaded, clean errors, crashes, hangs].</summary>
    public IReadOnlyDictionary<string, int[]> ByMutation { get; init; } = new Dictionary<string, int[]>();

    public JsonObject ToJson()
    {
        static JsonObject Counts(IReadOnlyDictionary<string, int[]> d, bool compact)
        {
            var o = new JsonObject();
            foreach (var (k, v) in d.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                o[k] = compact ? $"{v[0]}/{v[1]}/{v[2]}/{v[3]}/{v[4]}"
                    : new JsonObject { ["cases"] = v[0], ["loaded"] = v[1], ["clean_errors"] = v[2], ["crashes"] = v[3], ["hangs"] = v[4] };
            return o;
        }
        var sig = new JsonObject();
        foreach (var (k, v) in CrashSignatures.OrderByDescending(kv => kv.Value).ThenBy(kv => kv.Key, StringComparer.Ordinal)) sig[k] = v;
        var kinds = new JsonObject();
        foreach (var (k, v) in CrashKinds.OrderByDescending(kv => kv.Value).ThenBy(kv => kv.Key, StringComparer.Ordinal)) kinds[k] = v;
        return new JsonObject
        {
            ["tool"] = "LlmSnp.Reliability.HeaderFuzzer",
            ["seed"] = Seed,
            ["cases"] = Cases,
            ["loaded"] = Loaded,
            ["clean_errors"] = CleanErrors,
            ["crashes"] = Crashes,
            ["hangs"] = Hangs,
            ["seconds"] = Math.Round(Seconds, 3),
            ["per_case_limit_seconds"] = PerCaseLimitSeconds,
            ["clean_errors_without_path"] = CleanErrorsWithoutPath,
            ["crash_examples"] = new JsonArray(CrashExamples.Select(s => (JsonNode)s).ToArray()),
            ["crash_kinds"] = kinds,
            ["crash_signatures"] = sig,
            ["unnamed_error_examples"] = new JsonArray(UnnamedErrorExamples.Select(s => (JsonNode)s).ToArray()),
            ["hang_examples"] = new JsonArray(HangExamples.Select(s => (JsonNode)s).ToArray()),
            ["memory"] = new JsonObject
            {
                ["limit_bytes_per_case"] = HeaderFuzzer.MemoryLimitBytes,
                ["peak_working_set_growth_bytes"] = PeakWorkingSetGrowthBytes,
                ["max_case_managed_allocated_bytes"] = MaxCaseAllocatedBytes,
                ["max_case_managed_allocated_example"] = MaxCaseAllocatedExample,
                ["findings"] = new JsonArray(MemoryFindings.Select(s => (JsonNode)s).ToArray()),
            },
            ["by_target"] = Counts(ByTarget, compact: false),
            ["by_mutation_columns"] = "cases/loaded/clean_errors/crashes/hangs",
            ["by_mutation"] = Counts(ByMutation, compact: true),
        };
    }
}

/// <summary>
/// Seeded fuzzing of everything LlmSnp reads from disk before it computes: safetensors headers,
/// sharded indexes and OPT config.json files. Each case builds a valid small artefact, mutates it
/// (header lengths, truncated or hostile JSON, offsets, dtypes, shapes, duplicates, non-UTF-8,
/// nesting, truncation, byte flips, config field edits) and opens it the way users do:
/// <see cref="SafeTensorsFile.Open"/> + every tensor read; <see cref="CheckpointReader"/> + every
/// tensor read; <see cref="ConfigFile.Load"/> + <see cref="OptConfig.From"/>; and for whole model
/// directories <see cref="OptModel"/> + every block + a short forward. Acceptable outcomes are a
/// successful load or an <see cref="LlmSnpException"/> whose one-line message names the file;
/// anything else is a crash, a case over the time limit a hang, a case allocating over 1 GB a
/// memory finding. Case i is a pure function of (seed, i), so any finding can be replayed with
/// <see cref="RunOne"/>.
/// </summary>
public static partial class HeaderFuzzer
{
    public const long MemoryLimitBytes = 1L << 30;
    const int MaxExamples = 20;

    public enum Target { File, Checkpoint, Config, Model, Llama, Vit, Tokenizer, Labels, Decoder, Mixture }

    /// <summary>The result of one case.</summary>
    public sealed record CaseResult(int Index, Target Target, string Mutation, string Outcome, string? Detail, string? ExceptionType, long AllocatedBytes, long WorkingSetGrowth)
    {
        /// <summary>What the mutations set (config fields and values), for replaying a finding by hand.</summary>
        public string Notes { get; init; } = "";
    }

    [ThreadStatic] static List<string>? _notes;

    static bool Note(string s)
    {
        _notes?.Add(s);
        return true;
    }

    public static FuzzReport Run(int cases, int seed, string workDir, TimeSpan perCaseLimit)
    {
        Directory.CreateDirectory(workDir);
        var sw = Stopwatch.StartNew();
        using var proc = Process.GetCurrentProcess();
        proc.Refresh();
        long peakStart = proc.PeakWorkingSet64;
        int loaded = 0, clean = 0, crashes = 0, hangs = 0, unnamed = 0;
        var crashEx = new List<string>();
        var unnamedEx = new List<string>();
        var hangEx = new List<string>();
        var memory = new List<string>();
        var signatures = new Dictionary<string, int>(StringComparer.Ordinal);
        var kinds = new Dictionary<string, int>(StringComparer.Ordinal);
        var byTarget = new Dictionary<string, int[]>(StringComparer.Ordinal);
        var byMutation = new Dictionary<string, int[]>(StringComparer.Ordinal);
        long maxAlloc = 0;
        string maxAllocExample = "";
        for (int i = 0; i < cases; i++)
        {
            string caseDir = Path.Combine(workDir, $"case-{i:D5}");
            int index = i;
            var task = Task.Run(() => RunOne(seed, index, caseDir));
            bool finished;
            try { finished = task.Wait(perCaseLimit); }
            catch (AggregateException) { finished = true; }   // RunOne catches everything; belt and braces
            string outcome, label;
            CaseResult? r = null;
            if (!finished)
            {
                var (t, m) = Describe(seed, index);
                label = $"{t}/{m}";
                outcome = "hang";
                hangs++;
                // Stop here: the abandoned case keeps running, and TorchSharp work on two threads at once is
                // unsafe (a collection on one can finalize a temporary Scalar the other is passing to libtorch).
                hangEx.Add($"case {i} [{label}]: still running after {perCaseLimit.TotalSeconds:G3} s; run stopped at this case");
            }
            else
            {
                r = task.IsFaulted
                    ? new CaseResult(i, Target.File, "harness", "crash", task.Exception!.InnerException?.Message, task.Exception.InnerException?.GetType().Name, 0, 0)
                    : task.Result;
                label = $"{r.Target}/{r.Mutation}";
                outcome = r.Outcome;
                switch (r.Outcome)
                {
                    case "loaded": loaded++; break;
                    case "clean": clean++; break;
                    case "unnamed":
                        clean++; unnamed++;
                        if (unnamedEx.Count < MaxExamples) unnamedEx.Add($"case {i} [{label}]: {r.Detail}");
                        break;
                    default:
                        crashes++;
                        string sig = $"{r.ExceptionType} @ {label}";
                        signatures[sig] = signatures.GetValueOrDefault(sig) + 1;
                        string kind = $"{r.ExceptionType}: {FirstSentence(r.Detail ?? "")}";
                        kinds[kind] = kinds.GetValueOrDefault(kind) + 1;
                        if (crashEx.Count < MaxExamples) crashEx.Add($"case {i} [{label}]{NotesSuffix(r)}: {r.ExceptionType}: {r.Detail}");
                        break;
                }
                if (r.AllocatedBytes > maxAlloc) { maxAlloc = r.AllocatedBytes; maxAllocExample = $"case {i} [{label}]{NotesSuffix(r)}: {r.AllocatedBytes} bytes"; }
                if (r.AllocatedBytes > MemoryLimitBytes || r.WorkingSetGrowth > MemoryLimitBytes)
                    memory.Add($"case {i} [{label}]{NotesSuffix(r)}: allocated {r.AllocatedBytes} managed bytes, working set grew {r.WorkingSetGrowth} bytes");
                TryDelete(caseDir);
            }
            Count(byTarget, label.Split('/')[0], outcome);
            Count(byMutation, label, outcome);
            if (!finished) { cases = i + 1; break; }
        }
        proc.Refresh();
        return new FuzzReport(cases, loaded, clean, crashes, hangs, crashEx, sw.Elapsed.TotalSeconds)
        {
            Seed = seed,
            PerCaseLimitSeconds = perCaseLimit.TotalSeconds,
            CleanErrorsWithoutPath = unnamed,
            UnnamedErrorExamples = unnamedEx,
            HangExamples = hangEx,
            MemoryFindings = memory,
            PeakWorkingSetGrowthBytes = Math.Max(0, proc.PeakWorkingSet64 - peakStart),
            MaxCaseAllocatedBytes = maxAlloc,
            MaxCaseAllocatedExample = maxAllocExample,
            CrashSignatures = signatures,
            CrashKinds = kinds,
            ByTarget = byTarget,
            ByMutation = byMutation,
        };
    }

    static string NotesSuffix(CaseResult r) => r.Notes.Length > 0 ? $" ({r.Notes})" : "";

    static string FirstSentence(string s)
    {
        int dot = s.IndexOf(". ", StringComparison.Ordinal);
        return (dot >= 0 ? s[..dot] : s).TrimEnd('.');
    }

    static void Count(Dictionary<string, int[]> d, string key, string outcome)
    {
        if (!d.TryGetValue(key, out var c)) d[key] = c = new int[5];
        c[0]++;
        c[outcome switch { "loaded" => 1, "clean" or "unnamed" => 2, "hang" => 4, _ => 3 }]++;
    }

    static void TryDelete(string dir)
    {
        try { if (Directory.Exists(dir)) Directory.Delete(dir, true); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }

    static Random CaseRng(int seed, int index) => new(unchecked(seed * 1_000_003 + index * 7919 + 17));

    /// <summary>The target and mutation case <paramref name="index"/> uses (without running it).</summary>
    public static (Target Target, string Mutation) Describe(int seed, int index)
    {
        var plan = Plan(CaseRng(seed, index));
        return (plan.Target, plan.Mutation);
    }

    /// <summary>Builds, mutates and opens case <paramref name="index"/> in <paramref name="caseDir"/>; never throws.</summary>
    public static CaseResult RunOne(int seed, int index, string caseDir)
    {
        var rng = CaseRng(seed, index);
        var plan = Plan(rng);
        _notes = new List<string>();
        long alloc0 = GC.GetAllocatedBytesForCurrentThread();
        long ws0 = WorkingSet();
        string outcome; string? detail = null, type = null;
        string? blamed = null;
        try
        {
            TryDelete(caseDir);
            Directory.CreateDirectory(caseDir);
            Built built;
            try { built = Build(plan, rng, caseDir); }
            catch (Exception e) { throw new HarnessException(e); }
            blamed = built.Blamed;
            Open(plan.Target, built.Blamed, built.Expected);
            outcome = "loaded";
        }
        catch (LlmSnpException e)
        {
            type = nameof(LlmSnpException);
            detail = e.Message;
            bool named = blamed != null && e.Message.Contains(blamed, StringComparison.Ordinal);
            outcome = named && !e.Message.Contains('\n') ? "clean" : "unnamed";
            if (outcome == "unnamed") detail = $"{(named ? "multi-line message" : $"does not name {blamed}")}: {FirstLine(e.Message)}";
        }
        catch (HarnessException e)
        {
            type = "HARNESS:" + e.InnerException!.GetType().Name;
            detail = FirstLine(e.InnerException.Message);
            outcome = "crash";
        }
        catch (Exception e)
        {
            type = e.GetType().Name;
            detail = FirstLine(e.Message);
            outcome = "crash";
        }
        long alloc = GC.GetAllocatedBytesForCurrentThread() - alloc0;
        long ws = WorkingSet() - ws0;
        string notes = string.Join("; ", _notes);
        _notes = null;
        return new CaseResult(index, plan.Target, plan.Mutation, outcome, detail, type, alloc, ws) { Notes = notes };
    }

    /// <summary>A failure of the fuzzer's own generator, reported apart from library crashes.</summary>
    sealed class HarnessException(Exception inner) : Exception(inner.Message, inner);

    static long WorkingSet()
    {
        using var p = Process.GetCurrentProcess();
        return p.WorkingSet64;
    }

    static string FirstLine(string s)
    {
        string l = s.Split('\n')[0].Trim();
        return l.Length > 300 ? l[..300] + "…" : l;
    }

    // ------------------------------------------------------------------ opening, as users do

    /// <summary>Opens the artefact at <paramref name="path"/> (a file for File, else a directory).</summary>
    static void Open(Target target, string path, Dictionary<string, StTensor>? expected)
    {
        switch (target)
        {
            case Target.File:
                using (var f = SafeTensorsFile.Open(path))
                {
                    foreach (var name in f.Tensors.Keys)
                    {
                        using var t = f.Read(name);
                        Verify(expected, name, f.Tensors[name].DType, t);
                    }
                    VerifyNames(expected, f.Tensors.Keys);
                }
                break;
            case Target.Checkpoint:
                using (var r = new CheckpointReader(path))
                {
                    foreach (var name in r.Names.ToList())
                    {
                        var stored = SafeDTypes.ToTorch(r.Entry(name).DType);
                        using var t = r.Read(name, stored, CPU);
                        Verify(expected, name, r.Entry(name).DType, t);
                    }
                    VerifyNames(expected, r.Names);
                    _ = r.StoredFloatDType;
                }
                break;
            case Target.Config:
                _ = OptConfig.From(ConfigFile.Load(path));
                break;
            case Target.Llama or Target.Vit or Target.Mixture:
                OpenFamilyModel(path);
                break;
            case Target.Decoder:
                OpenDecoder(path);
                break;
            case Target.Tokenizer:
                OpenTokenizer(path);
                break;
            case Target.Labels:
                OpenLabels(path);
                break;
            case Target.Model:
                {
                    using var m = new OptModel(path);   // ConfigFile.Load + OptConfig.From, then the checkpoint
                    using var scope = NewDisposeScope();
                    int n = Math.Min(4, m.Config.MaxPositions);
                    var ids = (torch.arange(n, ScalarType.Int64) % Math.Max(1, m.Config.VocabSize)).unsqueeze(0);
                    using var logits = m.ForwardAllInMemory(ids);
                    if (logits.shape[^1] != m.Config.VocabSize) throw new InvalidOperationException($"logits have {logits.shape[^1]} columns, vocab_size is {m.Config.VocabSize}");
                    break;
                }
        }
    }

    /// <summary>A load that "succeeded" with other bytes, dtype or shape than were written is silent corruption.</summary>
    sealed class SilentCorruptionException(string message) : Exception(message);

    static void Verify(Dictionary<string, StTensor>? expected, string name, SafeDType dtype, Tensor t)
    {
        if (expected == null) return;
        if (!expected.TryGetValue(name, out var e)) throw new SilentCorruptionException($"tensor '{name}' was never written");
        if (dtype.ToString() != e.DType || !t.shape.SequenceEqual(e.Shape))
            throw new SilentCorruptionException($"tensor '{name}' read as {dtype} [{string.Join(", ", t.shape)}], written as {e.DType} [{string.Join(", ", e.Shape)}]");
        using var c = t.contiguous();
        var bytes = c.numel() == 0 ? Array.Empty<byte>() : c.bytes.ToArray();
        if (!bytes.AsSpan().SequenceEqual(e.Data)) throw new SilentCorruptionException($"tensor '{name}' read back with different bytes");
    }

    static void VerifyNames(Dictionary<string, StTensor>? expected, IEnumerable<string> names)
    {
        if (expected == null) return;
        var got = names.ToHashSet(StringComparer.Ordinal);
        if (!got.SetEquals(expected.Keys)) throw new SilentCorruptionException($"read tensors [{string.Join(", ", got.Order())}], expected [{string.Join(", ", expected.Keys.Order())}]");
    }

    // ------------------------------------------------------------------ case plans

    sealed record CasePlan(Target Target, string Mutation, int Stack);

    static readonly string[] FileMutations =
    {
        "valid", "len-huge", "len-negative", "len-past-end", "len-short", "len-zero", "len-long-by-few", "json-truncated",
        "offsets-out-of-range", "offsets-begin-after-end", "offsets-negative", "offsets-wrong-type", "offsets-overlap",
        "offsets-gap", "offsets-swap", "offsets-huge", "dtype-change", "dtype-invalid", "shape-change", "shape-invalid",
        "shape-huge-claim", "data-size-mismatch", "duplicate-name", "duplicate-metadata", "non-utf8", "deep-nesting",
        "zero-sized", "rank0", "rank0-empty", "truncated-file", "trailing-bytes", "byte-flips", "header-byte-flips",
        "metadata-wrong", "entry-not-object", "missing-field", "header-not-object", "empty-header", "padding",
        "weird-names", "extra-entry-field", "json-garbage",
    };

    static readonly string[] IndexMutations =
    {
        "index-valid", "index-invalid-json", "index-truncated", "index-non-utf8-key", "index-non-utf8-value", "index-deep",
        "index-duplicate-key", "index-missing-weight-map", "index-weight-map-wrong-type", "index-entry-non-string",
        "index-ghost-tensor", "index-wrong-shard", "index-missing-shard-file", "index-path-traversal", "index-empty-map",
        "index-unlisted-tensor", "index-points-at-index", "index-weird-filename", "index-shard-is-directory",
        "index-and-single-file", "index-byte-flips", "index-not-object", "index-tensor-in-two-shards", "no-weights",
    };

    static readonly string[] ConfigMutations =
    {
        "cfg-valid", "cfg-wrong-type", "cfg-negative", "cfg-zero", "cfg-huge", "cfg-missing", "cfg-model-type",
        "cfg-activation", "cfg-enable-bias-false", "cfg-ln-affine-false", "cfg-heads-not-dividing", "cfg-width-lists",
        "cfg-duplicate-key", "cfg-non-utf8", "cfg-truncated", "cfg-deep", "cfg-not-object", "cfg-byte-flips",
        "cfg-bom", "cfg-float-for-int", "cfg-bool-fields", "cfg-plausible-edit", "cfg-empty-file",
    };

    static readonly string[] ModelMutations =
    {
        "model-valid", "model-transposed", "model-missing-tensor", "model-extra-tensor", "model-decoder-prefix",
        "model-untied-head", "model-untied-without-head", "model-huge-vocab", "model-huge-hidden", "model-huge-layers",
        "model-huge-positions", "model-int-dtype", "model-fewer-layers", "model-post-ln", "model-proj-dim",
        "model-pruned-widths-consistent", "model-pruned-widths-inconsistent", "model-half-dtype", "model-config-edit",
        "model-weights-edit", "model-sharded-edit", "model-huge-ffn",
    };

    static CasePlan Plan(Random rng)
    {
        // Half the cases for the OPT-era targets, half for the other families and the tokenizer and labels files.
        double u = rng.NextDouble();
        var target = u < 0.18 ? Target.File : u < 0.28 ? Target.Checkpoint : u < 0.38 ? Target.Config : u < 0.50 ? Target.Model
            : u < 0.60 ? Target.Llama : u < 0.66 ? Target.Decoder : u < 0.72 ? Target.Mixture : u < 0.80 ? Target.Vit : u < 0.90 ? Target.Tokenizer : Target.Labels;
        string[] list = target switch
        {
            Target.Llama => LlamaMutations,
            Target.Decoder => DecoderMutations,
            Target.Mixture => MixtureMutations,
            Target.Vit => VitMutations,
            Target.Tokenizer => TokenizerMutations,
            Target.Labels => LabelsMutations,
            Target.File => FileMutations,
            Target.Checkpoint => rng.NextDouble() < 0.6 ? IndexMutations : FileMutations,
            Target.Config => ConfigMutations,
            _ => ModelMutations,
        };
        string m = list[rng.Next(list.Length)];
        int stack = rng.NextDouble() < 0.12 ? 2 : 1;   // occasionally a second random mutation on top
        return new CasePlan(target, m, stack);
    }

    /// <summary>What a case wrote: the path an error must name, and (for mutations that keep the data valid) what a load must return.</summary>
    sealed record Built(string Blamed, Dictionary<string, StTensor>? Expected);

    /// <summary>File mutations after which the file is still valid and must read back exactly as written.</summary>
    static readonly HashSet<string> PreservingFileMutations = new(StringComparer.Ordinal) { "valid", "zero-sized", "rank0", "weird-names", "extra-entry-field", "padding" };
    static readonly HashSet<string> PreservingIndexMutations = new(StringComparer.Ordinal) { "index-valid", "index-tensor-in-two-shards", "index-unlisted-tensor", "index-and-single-file" };

    static Dictionary<string, StTensor> ByName(IEnumerable<StTensor> ts) => ts.ToDictionary(t => t.Name, StringComparer.Ordinal);

    /// <summary>Writes the case's artefact.</summary>
    static Built Build(CasePlan plan, Random rng, string dir)
    {
        switch (plan.Target)
        {
            case Target.File:
                {
                    var st = new StBuild(RandomTensors(rng));
                    MutateFile(st, plan.Mutation, rng);
                    if (plan.Stack > 1) Stacked(() => MutateFile(st, FileMutations[rng.Next(FileMutations.Length)], rng));
                    string path = Path.Combine(dir, "model.safetensors");
                    File.WriteAllBytes(path, st.Bytes());
                    return new Built(path, plan.Stack == 1 && PreservingFileMutations.Contains(plan.Mutation) ? ByName(st.Tensors) : null);
                }
            case Target.Checkpoint:
                {
                    var ck = new CkBuild(RandomTensors(rng, min: 3), shards: rng.NextDouble() < 0.6 ? rng.Next(2, 4) : 1);
                    bool preserving = plan.Stack == 1 && ck.Index != null && PreservingIndexMutations.Contains(plan.Mutation);
                    MutateCheckpoint(ck, plan.Mutation, rng);
                    if (plan.Stack > 1) Stacked(() => MutateCheckpoint(ck, IndexMutations[rng.Next(IndexMutations.Length)], rng));
                    ck.Write(dir);
                    Dictionary<string, StTensor>? expected = null;
                    if (preserving)
                    {
                        // The index decides which shard owns each name.
                        expected = new(StringComparer.Ordinal);
                        foreach (var (name, file) in ck.WeightMap!)
                            expected[name] = ck.Shards[ck.ShardNames.IndexOf(file!.GetValue<string>())].Tensors.Single(t => t.Name == name);
                    }
                    return new Built(dir, expected);
                }
            case Target.Config:
                {
                    var cfg = new CfgBuild(TinyConfig(rng));
                    MutateConfig(cfg, plan.Mutation, rng);
                    if (plan.Stack > 1) Stacked(() => MutateConfig(cfg, ConfigMutations[rng.Next(ConfigMutations.Length)], rng));
                    File.WriteAllBytes(Path.Combine(dir, "config.json"), cfg.Bytes());
                    return new Built(dir, null);
                }
            case Target.Llama: return BuildLlama(plan, rng, dir);
            case Target.Decoder: return BuildDecoder(plan, rng, dir);
            case Target.Mixture: return BuildMixture(plan, rng, dir);
            case Target.Vit: return BuildVit(plan, rng, dir);
            case Target.Tokenizer: return BuildTokenizer(plan, rng, dir);
            case Target.Labels: return BuildLabels(plan, rng, dir);
            default:
                {
                    var model = new ModelBuild(rng);
                    MutateModel(model, plan.Mutation, rng);
                    model.Write(dir);
                    return new Built(dir, null);
                }
        }
    }

    /// <summary>A second mutation may not apply to what the first left (e.g. offsets that are no longer numbers): then it is skipped.</summary>
    static void Stacked(Action mutate)
    {
        try { mutate(); }
        catch (Exception e) when (e is InvalidCastException or InvalidOperationException or NullReferenceException or FormatException or ArgumentException) { }
    }

    // ------------------------------------------------------------------ safetensors building blocks

    sealed class StTensor
    {
        public required string Name;
        public required string DType;
        public required long[] Shape;
        public required byte[] Data;
    }

    // The library's own dtype table: a dtype added there is fuzzed here without a second list to keep in step.
    static readonly string[] DTypes = Enum.GetNames<SafeDType>();

    static int DTypeSize(string d) => SafeDTypes.Size(SafeDTypes.Parse(d, "fuzzer"));

    static T Pick<T>(Random rng, params T[] xs) => xs[rng.Next(xs.Length)];

    static byte[] RandomData(Random rng, string dtype, long numel)
    {
        var b = new byte[numel * DTypeSize(dtype)];
        switch (dtype)
        {
            case "F32":
                for (long i = 0; i < numel; i++) BitConverter.TryWriteBytes(b.AsSpan((int)(i * 4)), rng.NextSingle() * 2 - 1);
                break;
            case "F64":
                for (long i = 0; i < numel; i++) BitConverter.TryWriteBytes(b.AsSpan((int)(i * 8)), rng.NextDouble() * 2 - 1);
                break;
            case "F16":
                for (long i = 0; i < numel; i++) BitConverter.TryWriteBytes(b.AsSpan((int)(i * 2)), (Half)(rng.NextSingle() * 2 - 1));
                break;
            case "BF16":
                for (long i = 0; i < numel; i++)
                    BitConverter.TryWriteBytes(b.AsSpan((int)(i * 2)), (ushort)(BitConverter.SingleToUInt32Bits(rng.NextSingle() * 2 - 1) >> 16));
                break;
            case "BOOL":
                for (long i = 0; i < numel; i++) b[i] = (byte)rng.Next(2);
                break;
            default:
                rng.NextBytes(b);
                break;
        }
        return b;
    }

    static StTensor MakeTensor(Random rng, string name, string dtype, params long[] shape) =>
        new() { Name = name, DType = dtype, Shape = shape, Data = RandomData(rng, dtype, shape.Aggregate(1L, (a, d) => a * d)) };

    static List<StTensor> RandomTensors(Random rng, int min = 1)
    {
        int n = rng.Next(min, 6);
        var list = new List<StTensor>();
        for (int i = 0; i < n; i++)
        {
            int rank = rng.Next(0, 4);
            var shape = Enumerable.Range(0, rank).Select(_ => (long)rng.Next(1, 6)).ToArray();
            if (rank > 0 && rng.NextDouble() < 0.08) shape[rng.Next(rank)] = 0;
            list.Add(MakeTensor(rng, $"layer{i}.{Pick(rng, "weight", "bias", "scale", "ids")}", Pick(rng, DTypes), shape));
        }
        return list;
    }

    /// <summary>A safetensors file as a header model plus raw edits applied at serialisation.</summary>
    sealed class StBuild
    {
        public readonly List<StTensor> Tensors;
        public JsonObject Header;
        public byte[] Data;
        public readonly List<Func<byte[], byte[]>> HeaderEdits = new();
        public Func<long, long, ulong>? Length;   // (actual header length, data length) → written value
        public readonly List<Func<byte[], byte[]>> FileEdits = new();
        public bool Pad = true;
        public byte PadByte = (byte)' ';

        public StBuild(List<StTensor> tensors)
        {
            Tensors = tensors;
            (Header, Data) = Layout(tensors, metadata: true);
        }

        public void Relayout(bool metadata = true) => (Header, Data) = Layout(Tensors, metadata);

        public static (JsonObject, byte[]) Layout(List<StTensor> tensors, bool metadata)
        {
            var h = new JsonObject();
            if (metadata) h["__metadata__"] = new JsonObject { ["format"] = "pt" };
            long off = 0;
            using var data = new MemoryStream();
            foreach (var t in tensors)
            {
                h[t.Name] = new JsonObject
                {
                    ["dtype"] = t.DType,
                    ["shape"] = new JsonArray(t.Shape.Select(d => (JsonNode)d).ToArray()),
                    ["data_offsets"] = new JsonArray(off, off + t.Data.Length),
                };
                off += t.Data.Length;
                data.Write(t.Data);
            }
            return (h, data.ToArray());
        }

        public JsonObject? Entry(string name) => Header[name] as JsonObject;

        public IEnumerable<string> EntryNames => Header.Where(kv => kv.Key != "__metadata__" && kv.Value is JsonObject).Select(kv => kv.Key);

        public byte[] HeaderBytes()
        {
            byte[] json = Encoding.UTF8.GetBytes(Header.ToJsonString());
            foreach (var e in HeaderEdits) json = e(json);
            if (Pad && json.Length % 8 != 0)
            {
                var padded = new byte[(json.Length + 7) / 8 * 8];
                Array.Fill(padded, PadByte);
                json.CopyTo(padded, 0);
                json = padded;
            }
            return json;
        }

        public byte[] Bytes()
        {
            byte[] header = HeaderBytes();
            ulong n = Length?.Invoke(header.Length, Data.Length) ?? (ulong)header.Length;
            var file = new byte[8 + header.Length + Data.Length];
            BitConverter.TryWriteBytes(file.AsSpan(0, 8), n);
            header.CopyTo(file, 8);
            Data.CopyTo(file, 8 + header.Length);
            foreach (var e in FileEdits) file = e(file);
            return file;
        }
    }

    static byte[] Insert(byte[] a, int at, byte[] what)
    {
        at = Math.Clamp(at, 0, a.Length);
        var r = new byte[a.Length + what.Length];
        a.AsSpan(0, at).CopyTo(r);
        what.CopyTo(r, at);
        a.AsSpan(at).CopyTo(r.AsSpan(at + what.Length));
        return r;
    }

    static byte[] Utf8(string s) => Encoding.UTF8.GetBytes(s);

    /// <summary>Byte sequences that are not UTF-8: lone continuation, overlong NUL, surrogate, truncated sequences, 0xFF.</summary>
    static readonly byte[][] BadUtf8 =
    {
        new byte[] { 0xFF }, new byte[] { 0x80 }, new byte[] { 0xC0, 0x80 }, new byte[] { 0xED, 0xA0, 0x80 },
        new byte[] { 0xE2, 0x82 }, new byte[] { 0xF4, 0x90, 0x80, 0x80 }, new byte[] { 0xFE, 0xFE, 0xFF, 0xFF }, new byte[] { 0xC3 },
    };

    /// <summary>Inserts non-UTF-8 bytes inside a JSON string (just after an opening quote) or anywhere.</summary>
    static byte[] InsertBadUtf8(byte[] json, Random rng)
    {
        var quotes = Enumerable.Range(0, json.Length).Where(i => json[i] == (byte)'"').ToList();
        int at = quotes.Count > 0 && rng.NextDouble() < 0.85 ? quotes[rng.Next(quotes.Count)] + 1 : rng.Next(json.Length + 1);
        return Insert(json, at, Pick(rng, BadUtf8));
    }

    static string Nest(Random rng, int depth, bool balanced)
    {
        bool obj = rng.NextDouble() < 0.5;
        var sb = new StringBuilder();
        for (int i = 0; i < depth; i++) sb.Append(obj ? "{\"a\":" : "[");
        sb.Append('1');
        if (balanced) for (int i = 0; i < depth; i++) sb.Append(obj ? '}' : ']');
        return sb.ToString();
    }

    static int NestDepth(Random rng) => Pick(rng, 15, 16, 17, 31, 32, 33, 64, 65, 1000, 100_000);

    static byte[] Flip(byte[] a, Random rng, int from, int to, int flips)
    {
        if (to <= from) return a;
        var r = (byte[])a.Clone();
        for (int k = 0; k < flips; k++) r[rng.Next(from, to)] ^= (byte)(1 << rng.Next(8));
        return r;
    }

    static JsonNode WrongJson(Random rng) => Pick<Func<JsonNode>>(rng,
        () => JsonValue.Create("12")!, () => JsonValue.Create(12.5)!, () => JsonValue.Create(true)!, () => new JsonArray(1, 2),
        () => new JsonObject { ["x"] = 1 }, () => JsonValue.Create(-1)!, () => JsonValue.Create(1e300)!, () => JsonValue.Create("")!)();

    static void MutateFile(StBuild st, string m, Random rng)
    {
        var names = st.EntryNames.ToList();
        string? victim = names.Count > 0 ? names[rng.Next(names.Count)] : null;
        JsonObject? e = victim != null ? st.Entry(victim) : null;
        JsonArray? offs = e?["data_offsets"] as JsonArray;
        long Off(int k) => offs![k]!.GetValue<long>();
        switch (m)
        {
            case "valid": break;
            case "len-huge":
                ulong huge = Pick(rng, ulong.MaxValue, 1UL << 63, (ulong)SafeTensorsFile.MaxHeaderBytes + 1, 1UL << 40, uint.MaxValue, (ulong)int.MaxValue + 1);
                st.Length = (_, _) => huge;
                break;
            case "len-negative":
                ulong neg = unchecked((ulong)(long)-Pick(rng, 1, 8, 1000, int.MaxValue));
                st.Length = (_, _) => neg;
                break;
            case "len-past-end":
                long past = rng.Next(1, 1000);
                st.Length = (h, d) => (ulong)(h + d + past);
                break;
            case "len-short":
                st.Length = (h, _) => (ulong)rng.Next(0, (int)Math.Max(1, h));
                break;
            case "len-zero": st.Length = (_, _) => 0; break;
            case "len-long-by-few":
                int few = rng.Next(1, 9);
                st.Length = (h, d) => (ulong)(h + Math.Min(few, d));
                break;
            case "json-truncated":
                st.Pad = false;
                st.HeaderEdits.Add(h => h[..rng.Next(0, h.Length)]);
                break;
            case "offsets-out-of-range":
                if (offs == null) goto case "trailing-bytes";
                long extra = Pick(rng, 1L, 8L, 1000L, 1L << 33, long.MaxValue - Off(1));
                offs[1] = Off(1) + extra;
                if (rng.NextDouble() < 0.5) offs[0] = Off(0) + extra;
                break;
            case "offsets-begin-after-end":
                if (offs == null) goto case "len-zero";
                long b = Off(0), en = Off(1);
                offs[0] = en + 1; offs[1] = b;
                break;
            case "offsets-negative":
                if (offs == null) goto case "len-negative";
                offs[rng.Next(2)] = -Pick(rng, 1L, 4L, long.MaxValue);
                break;
            case "offsets-wrong-type":
                if (e == null) goto case "json-truncated";
                e["data_offsets"] = Pick<Func<JsonNode?>>(rng,
                    () => new JsonArray(0.5, 4), () => new JsonArray("0", "4"), () => new JsonArray(0), () => new JsonArray(0, 4, 8),
                    () => new JsonObject { ["begin"] = 0 }, () => null, () => JsonValue.Create("0,4"), () => new JsonArray(JsonValue.Create(0), null),
                    () => new JsonArray(0, 1e20), () => new JsonArray(new JsonArray(0), 4))();
                break;
            case "offsets-overlap":
                if (offs == null || names.Count < 2) goto case "offsets-out-of-range";
                {
                    long shift = rng.Next(1, 9);
                    offs[0] = Math.Max(0, Off(0) - shift); offs[1] = Math.Max(0, Off(1) - shift);
                }
                break;
            case "offsets-gap":
                if (offs == null) goto case "trailing-bytes";
                {
                    // Shift the victim and everything after it, inserting unowned bytes before it.
                    long shift = rng.Next(1, 9), at = Off(0);
                    foreach (var n in names)
                    {
                        var o = (JsonArray)st.Entry(n)!["data_offsets"]!;
                        if (o[0]!.GetValue<long>() < at && n != victim) continue;
                        o[0] = o[0]!.GetValue<long>() + shift; o[1] = o[1]!.GetValue<long>() + shift;
                    }
                    st.Data = st.Data[..(int)at].Concat(new byte[shift]).Concat(st.Data[(int)at..]).ToArray();
                }
                break;
            case "offsets-swap":
                if (names.Count < 2) goto case "offsets-overlap";
                {
                    var a = (JsonArray)st.Entry(names[0])!["data_offsets"]!;
                    var c = (JsonArray)st.Entry(names[^1])!["data_offsets"]!;
                    var tmp = a.DeepClone();
                    st.Entry(names[0])!["data_offsets"] = c.DeepClone();
                    st.Entry(names[^1])!["data_offsets"] = tmp;
                }
                break;
            case "offsets-huge":
                if (offs == null) goto case "len-huge";
                offs[0] = Pick(rng, long.MaxValue, long.MaxValue - 1, 1L << 62);
                offs[1] = long.MaxValue;
                break;
            case "dtype-change":
                if (e == null) goto case "dtype-invalid";
                e["dtype"] = Pick(rng, DTypes);
                break;
            case "dtype-invalid":
                if (e == null) goto case "header-not-object";
                e["dtype"] = Pick<Func<JsonNode?>>(rng, () => "F8_E4M3", () => "F8_E5M2", () => "", () => "f32", () => "Q4_0", () => 4, () => null,
                    () => new JsonArray("F32"), () => "F32 ", () => "C64", () => "U16", () => "U32", () => "U64")();
                break;
            case "shape-change":
                if (e == null) goto case "shape-invalid";
                {
                    var shape = ((JsonArray)e["shape"]!).Select(x => x!.GetValue<long>()).ToList();
                    switch (rng.Next(4))
                    {
                        case 0: shape.Insert(rng.Next(shape.Count + 1), 1); break;          // same numel: still valid
                        case 1: if (shape.Count > 0) shape.RemoveAt(rng.Next(shape.Count)); break;
                        case 2: if (shape.Count > 0) shape[rng.Next(shape.Count)] += rng.Next(1, 4); else shape.Add(2); break;
                        default: shape.Reverse(); break;                                     // same numel: still valid
                    }
                    e["shape"] = new JsonArray(shape.Select(d => (JsonNode)d).ToArray());
                }
                break;
            case "shape-invalid":
                if (e == null) goto case "header-not-object";
                e["shape"] = Pick<Func<JsonNode?>>(rng, () => new JsonArray(-1, 2), () => new JsonArray(1.5), () => new JsonArray("2"),
                    () => null, () => JsonValue.Create(4), () => new JsonArray(new JsonArray(2)), () => new JsonArray(long.MaxValue, 2),
                    () => new JsonArray(4294967296L, 4294967296L, 4), () => new JsonArray(1e30), () => new JsonObject())();
                break;
            case "shape-huge-claim":
                if (e == null || offs == null) goto case "shape-invalid";
                {
                    // A consistent header for a tensor far larger than the file: must fail on the buffer size, not allocate.
                    long numel = Pick(rng, 1L << 31, 1L << 40, 1L << 50);
                    e["dtype"] = "U8";
                    e["shape"] = new JsonArray(numel);
                    offs[1] = Off(0) + numel;
                }
                break;
            case "data-size-mismatch":
                st.Data = rng.NextDouble() < 0.5 && st.Data.Length > 0 ? st.Data[..rng.Next(st.Data.Length)] : st.Data.Concat(new byte[rng.Next(1, 16)]).ToArray();
                break;
            case "duplicate-name":
                if (e == null) goto case "duplicate-metadata";
                {
                    string dup = $",\"{victim}\":{e.ToJsonString()}";
                    st.HeaderEdits.Add(h => Insert(h, h.Length - 1, Utf8(dup)));
                }
                break;
            case "duplicate-metadata":
                st.HeaderEdits.Add(h => Insert(h, h.Length - 1, Utf8(rng.NextDouble() < 0.5 ? ",\"__metadata__\":{\"format\":\"pt\"}" : ",\"__metadata__\":{}")));
                break;
            case "non-utf8":
                st.HeaderEdits.Add(h => InsertBadUtf8(h, rng));
                break;
            case "deep-nesting":
                {
                    int depth = NestDepth(rng);
                    bool balanced = rng.NextDouble() < 0.7;
                    switch (rng.Next(3))
                    {
                        case 0: st.HeaderEdits.Add(h => Insert(h, 1, Utf8($"\"deep\":{Nest(rng, depth, balanced)},"))); break;
                        case 1: st.HeaderEdits.Add(_ => Utf8(Nest(rng, depth, balanced))); break;
                        default:
                            if (victim == null) goto case 1;
                            st.HeaderEdits.Add(h =>
                            {
                                string s = Encoding.UTF8.GetString(h);
                                int at = s.IndexOf($"\"{victim}\":{{", StringComparison.Ordinal);
                                return at < 0 ? h : Insert(h, Encoding.UTF8.GetByteCount(s[..at]) + Encoding.UTF8.GetByteCount($"\"{victim}\":{{"), Utf8($"\"extra\":{Nest(rng, depth, balanced)},"));
                            });
                            break;
                    }
                }
                break;
            case "zero-sized":
                st.Tensors.Insert(rng.Next(st.Tensors.Count + 1), MakeTensor(rng, "empty." + rng.Next(100), Pick(rng, DTypes), Pick(rng, new long[] { 0 }, new long[] { 3, 0 }, new long[] { 0, 0, 5 })));
                st.Relayout();
                break;
            case "rank0":
                st.Tensors.Insert(rng.Next(st.Tensors.Count + 1), MakeTensor(rng, "scalar." + rng.Next(100), Pick(rng, DTypes)));
                st.Relayout();
                break;
            case "rank0-empty":
                if (e == null || offs == null) goto case "rank0";
                e["shape"] = new JsonArray();
                offs[1] = Off(0);   // rank 0 holds one element, not zero bytes
                break;
            case "truncated-file":
                st.FileEdits.Add(f => f[..rng.Next(0, f.Length)]);
                break;
            case "trailing-bytes":
                {
                    var tail = new byte[rng.Next(1, 64)];
                    rng.NextBytes(tail);
                    st.FileEdits.Add(f => f.Concat(tail).ToArray());
                }
                break;
            case "byte-flips":
                {
                    int flips = rng.Next(1, 9);
                    st.FileEdits.Add(f => Flip(f, rng, 0, f.Length, flips));
                }
                break;
            case "header-byte-flips":
                {
                    int flips = rng.Next(1, 5);
                    st.FileEdits.Add(f => Flip(f, rng, 8, (int)Math.Min(f.Length, 8 + (long)BitConverter.ToUInt64(f, 0)), flips));
                }
                break;
            case "metadata-wrong":
                st.Header["__metadata__"] = Pick<Func<JsonNode?>>(rng, () => new JsonObject { ["format"] = 1 }, () => new JsonArray("format", "pt"),
                    () => null, () => "pt", () => new JsonObject { ["nested"] = new JsonObject { ["a"] = "b" } }, () => new JsonObject { ["n"] = null })();
                break;
            case "entry-not-object":
                if (victim == null) goto case "header-not-object";
                st.Header[victim] = Pick<Func<JsonNode?>>(rng, () => new JsonArray("F32", new JsonArray(1), new JsonArray(0, 4)), () => null, () => "F32", () => 7)();
                break;
            case "missing-field":
                if (e == null) goto case "metadata-wrong";
                e.Remove(Pick(rng, "dtype", "shape", "data_offsets"));
                break;
            case "header-not-object":
                st.HeaderEdits.Add(_ => Utf8(Pick(rng, "[]", "null", "\"x\"", "1", "[{}]", "true", "")));
                break;
            case "empty-header":
                st.Tensors.Clear();
                st.Relayout(metadata: rng.NextDouble() < 0.5);
                if (rng.NextDouble() < 0.4) st.Data = new byte[rng.Next(1, 16)];   // data with nothing to own it
                break;
            case "padding":
                st.PadByte = Pick(rng, (byte)' ', (byte)0, (byte)'\t', (byte)'\n', (byte)'\r', (byte)'x');
                st.HeaderEdits.Add(h => h.Concat(Enumerable.Repeat(st.PadByte, rng.Next(1, 8))).ToArray());
                break;
            case "weird-names":
                if (st.Tensors.Count == 0) goto case "rank0";
                st.Tensors[rng.Next(st.Tensors.Count)].Name = Pick(rng, "", " ", "\u0000", "é.weight", "😀", "a\"b", "a\\b", "__metadata", "__metadata__x", new string('n', 5000), "\u202Eevil", "\uFEFFbom");
                if (st.Tensors.Select(t => t.Name).Distinct().Count() != st.Tensors.Count) st.Tensors[0].Name += "#";
                st.Relayout();
                break;
            case "extra-entry-field":
                if (e == null) goto case "rank0";
                e[Pick(rng, "extra", "dtype2", "offsets")] = WrongJson(rng);
                break;
            case "json-garbage":
                st.HeaderEdits.Add(h => Insert(h, rng.Next(h.Length + 1), Utf8(Pick(rng, ",", "}", "{", "]", ":", "\"", "//", "/*", "NaN", "Infinity", "\\u12"))));
                break;
            default: throw new InvalidOperationException($"unknown file mutation {m}");
        }
    }

    // ------------------------------------------------------------------ checkpoints (single file or shards + index)

    sealed class CkBuild
    {
        public readonly List<StBuild> Shards = new();
        public readonly List<string> ShardNames = new();
        public JsonObject? Index;
        public readonly List<Func<byte[], byte[]>> IndexEdits = new();
        public readonly List<Action<string>> DirEdits = new();

        public CkBuild(List<StTensor> tensors, int shards)
        {
            shards = Math.Min(shards, tensors.Count);
            var groups = Enumerable.Range(0, shards).Select(s => tensors.Where((_, i) => i % shards == s).ToList()).ToList();
            for (int s = 0; s < shards; s++)
            {
                Shards.Add(new StBuild(groups[s]));
                ShardNames.Add(shards == 1 ? SafeTensorsWriter.SingleFileName : $"model-{s + 1:D5}-of-{shards:D5}.safetensors");
            }
            if (shards > 1)
            {
                var wm = new JsonObject();
                for (int s = 0; s < shards; s++) foreach (var t in groups[s]) wm[t.Name] = ShardNames[s];
                Index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = tensors.Sum(t => (long)t.Data.Length) }, ["weight_map"] = wm };
            }
        }

        public JsonObject? WeightMap => Index?["weight_map"] as JsonObject;

        public void Write(string dir)
        {
            for (int s = 0; s < Shards.Count; s++) File.WriteAllBytes(Path.Combine(dir, ShardNames[s]), Shards[s].Bytes());
            if (Index != null)
            {
                byte[] bytes = Encoding.UTF8.GetBytes(Index.ToJsonString());
                foreach (var e in IndexEdits) bytes = e(bytes);
                File.WriteAllBytes(Path.Combine(dir, SafeTensorsWriter.IndexFileName), bytes);
            }
            foreach (var e in DirEdits) e(dir);
        }
    }

    static void MutateCheckpoint(CkBuild ck, string m, Random rng)
    {
        if (m.StartsWith("index-") && ck.Index == null && m != "index-and-single-file")
        {
            // A single-file checkpoint has no index: mutate its file instead.
            MutateFile(ck.Shards[0], FileMutations[rng.Next(FileMutations.Length)], rng);
            return;
        }
        if (!m.StartsWith("index-") && m != "no-weights")
        {
            MutateFile(ck.Shards[rng.Next(ck.Shards.Count)], m, rng);
            return;
        }
        var wm = ck.WeightMap;
        var keys = wm?.Select(kv => kv.Key).ToList() ?? new List<string>();
        string? key = keys.Count > 0 ? keys[rng.Next(keys.Count)] : null;
        switch (m)
        {
            case "index-valid": break;
            case "index-invalid-json":
                ck.IndexEdits.Add(b => Insert(b, rng.Next(b.Length + 1), Utf8(Pick(rng, ",", "}", "{", "\"", "]]", ":"))));
                break;
            case "index-truncated": ck.IndexEdits.Add(b => b[..rng.Next(b.Length)]); break;
            case "index-non-utf8-key":
            case "index-non-utf8-value":
                ck.IndexEdits.Add(b =>
                {
                    string s = Encoding.UTF8.GetString(b);
                    int wmAt = s.IndexOf("\"weight_map\"", StringComparison.Ordinal);
                    if (wmAt < 0) return InsertBadUtf8(b, rng);
                    // The first key inside weight_map, or the first value.
                    int keyQuote = s.IndexOf('"', s.IndexOf('{', wmAt) + 1);
                    int at = m == "index-non-utf8-key" ? keyQuote + 1 : s.IndexOf('"', s.IndexOf(':', keyQuote) + 1) + 1;
                    return Insert(b, Encoding.UTF8.GetByteCount(s[..at]), Pick(rng, BadUtf8));
                });
                break;
            case "index-deep":
                {
                    int depth = NestDepth(rng);
                    bool balanced = rng.NextDouble() < 0.7;
                    ck.IndexEdits.Add(b => Insert(b, 1, Utf8($"\"deep\":{Nest(rng, depth, balanced)},")));
                }
                break;
            case "index-duplicate-key":
                if (key == null) goto case "index-invalid-json";
                {
                    string other = ck.ShardNames[rng.Next(ck.ShardNames.Count)];
                    ck.IndexEdits.Add(b =>
                    {
                        string s = Encoding.UTF8.GetString(b);
                        int wmAt = s.IndexOf("\"weight_map\":{", StringComparison.Ordinal);
                        return wmAt < 0 ? b : Insert(b, Encoding.UTF8.GetByteCount(s[..(wmAt + 14)]), Utf8($"\"{key}\":\"{other}\","));
                    });
                }
                break;
            case "index-missing-weight-map": ck.Index!.Remove("weight_map"); break;
            case "index-weight-map-wrong-type":
                ck.Index!["weight_map"] = Pick<Func<JsonNode?>>(rng, () => 3, () => "model.safetensors", () => null, () => new JsonArray("a", "b"), () => true)();
                break;
            case "index-entry-non-string":
                if (key == null) goto case "index-missing-weight-map";
                wm![key] = Pick<Func<JsonNode?>>(rng, () => 3, () => null, () => new JsonArray(ck.ShardNames[0]), () => new JsonObject(), () => true)();
                break;
            case "index-ghost-tensor": wm![$"ghost.{rng.Next(100)}"] = ck.ShardNames[rng.Next(ck.ShardNames.Count)]; break;
            case "index-wrong-shard":
                if (key == null) goto case "index-ghost-tensor";
                {
                    string cur = wm![key]!.GetValue<string>();
                    wm[key] = ck.ShardNames.First(n => n != cur);
                }
                break;
            case "index-missing-shard-file":
                {
                    string victim = ck.ShardNames[rng.Next(ck.ShardNames.Count)];
                    ck.DirEdits.Add(d => File.Delete(Path.Combine(d, victim)));
                }
                break;
            case "index-path-traversal":
                if (key == null) goto case "index-ghost-tensor";
                wm![key] = Pick(rng, "../model.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ".", ".hidden.safetensors", "..\\x.safetensors", "~/x");
                break;
            case "index-empty-map": ck.Index!["weight_map"] = new JsonObject(); break;
            case "index-unlisted-tensor":
                if (key == null) goto case "index-ghost-tensor";
                wm!.Remove(key);   // the shard still holds it: ignored (the index decides)
                break;
            case "index-points-at-index":
                if (key == null) goto case "index-ghost-tensor";
                wm![key] = SafeTensorsWriter.IndexFileName;
                break;
            case "index-weird-filename":
                if (key == null) goto case "index-ghost-tensor";
                wm![key] = Pick(rng, "", " ", "\u0000", "a\u0000b.safetensors", new string('x', 300) + ".safetensors", "é.safetensors", "model.safetensors ", "CON", "*");
                break;
            case "index-shard-is-directory":
                {
                    string victim = ck.ShardNames[rng.Next(ck.ShardNames.Count)];
                    ck.DirEdits.Add(d => { File.Delete(Path.Combine(d, victim)); Directory.CreateDirectory(Path.Combine(d, victim)); });
                }
                break;
            case "index-and-single-file":
                {
                    // Both layouts present: the index must win (or the error must be clean).
                    var extra = new StBuild(RandomTensors(rng));
                    if (rng.NextDouble() < 0.5) MutateFile(extra, FileMutations[rng.Next(FileMutations.Length)], rng);
                    ck.DirEdits.Add(d =>
                    {
                        string single = Path.Combine(d, SafeTensorsWriter.SingleFileName);
                        if (!File.Exists(single)) File.WriteAllBytes(single, extra.Bytes());
                    });
                }
                break;
            case "index-byte-flips":
                {
                    int flips = rng.Next(1, 5);
                    ck.IndexEdits.Add(b => Flip(b, rng, 0, b.Length, flips));
                }
                break;
            case "index-not-object":
                ck.IndexEdits.Add(_ => Utf8(Pick(rng, "[]", "null", "\"weight_map\"", "", "{\"weight_map\":[]}", "{\"weight_map\":null}")));
                break;
            case "index-tensor-in-two-shards":
                if (ck.Shards.Count < 2 || ck.Shards[0].Tensors.Count == 0) goto case "index-ghost-tensor";
                {
                    // The same name inside two shard files: the index names one, the other copy must be ignored.
                    var t = ck.Shards[0].Tensors[0];
                    ck.Shards[1].Tensors.Add(MakeTensor(rng, t.Name, t.DType, t.Shape));
                    ck.Shards[1].Relayout();
                }
                break;
            case "no-weights":
                ck.DirEdits.Add(d =>
                {
                    foreach (var f in Directory.GetFiles(d)) File.Delete(f);
                });
                break;
            default: throw new InvalidOperationException($"unknown checkpoint mutation {m}");
        }
    }

    // ------------------------------------------------------------------ OPT config.json

    const int V = 16, H = 8, NHeads = 2, Ffn = 16, NLayers = 2, MaxPos = 8;

    static JsonObject TinyConfig(Random rng, int vocab = V, int hidden = H, int heads = NHeads, int ffn = Ffn, int layers = NLayers, int maxPos = MaxPos)
    {
        // The same config.json the benchmark's random OPTs get (OptShape.Config), plus a field the loader ignores.
        var c = new OptShape("fuzz", layers, hidden, heads, ffn, vocab, maxPos).Config(ScalarType.Float32);
        c["dropout"] = rng.NextDouble() < 0.5 ? 0.1 : 0.0;
        return c;
    }

    /// <summary>The config.json fields a family reads, by kind: what the generic config mutations aim at.</summary>
    sealed record ConfigFields(string[] Ints, string[] Bools, string[] Others)
    {
        public readonly string[] All = Ints.Concat(Bools).Concat(Others).ToArray();
    }

    static readonly ConfigFields OptFields = new(
        new[] { "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "max_position_embeddings", "word_embed_proj_dim" },
        new[] { "do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine", "tie_word_embeddings", "pruned" },
        new[] { "model_type", "activation_function", "ffn_dims", "num_heads_per_layer", "torch_dtype" });

    sealed class CfgBuild
    {
        public JsonObject Json;
        public readonly List<Func<byte[], byte[]>> Edits = new();
        public CfgBuild(JsonObject json) { Json = json; }
        public byte[] Bytes()
        {
            byte[] b = Encoding.UTF8.GetBytes(Json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            foreach (var e in Edits) b = e(b);
            return b;
        }
    }

    /// <summary>
    /// Huge values, including ones a 32-bit field cannot hold and ones it can but no checkpoint could back.
    /// num_hidden_layers gets 2^20 instead of 2^30: OptConfig.From sizes two int[num_hidden_layers] before the
    /// checkpoint is opened, and 2^30 layers would make this process allocate 8 GB (int.MaxValue still probes it).
    /// </summary>
    static JsonNode HugeValue(Random rng, string field) => Pick<Func<JsonNode>>(rng,
        () => JsonValue.Create(int.MaxValue)!, () => JsonValue.Create(1L << 31)!, () => JsonValue.Create(1L << 40)!, () => JsonValue.Create(long.MaxValue)!,
        () => JsonValue.Create(1e300)!, () => JsonValue.Create(field == "num_hidden_layers" ? 1 << 20 : 1 << 30)!, () => JsonValue.Create(ulong.MaxValue)!,
        () => JsonValue.Create(-(1L << 40))!)();

    static void Set(JsonObject j, string field, JsonNode? value)
    {
        j[field] = value;
        Note($"{field}={value?.ToJsonString() ?? "null"}");
    }

    static void MutateConfig(CfgBuild c, string m, Random rng, ConfigFields? fields = null)
    {
        var j = c.Json;
        var f0 = fields ?? OptFields;
        string[] AllFields = f0.All, BoolFields = f0.Bools;
        string field = Pick(rng, AllFields);
        string intField = Pick(rng, f0.Ints);
        switch (m)
        {
            case "cfg-valid": break;
            case "cfg-wrong-type": Set(j, field, WrongJson(rng)); break;
            case "cfg-negative": Set(j, intField, -Pick(rng, 1, 8, int.MaxValue)); break;
            case "cfg-zero": Set(j, intField, 0); break;
            case "cfg-huge":
                Set(j, intField, HugeValue(rng, intField));
                if (rng.NextDouble() < 0.3 && Note($"{intField}=1e400")) c.Edits.Add(b => Utf8(Encoding.UTF8.GetString(b).Replace($"\"{intField}\": {j[intField]!.ToJsonString()}", $"\"{intField}\": 1e400")));
                break;
            case "cfg-missing": j.Remove(field); Note($"-{field}"); break;
            case "cfg-model-type": Set(j, "model_type", Pick<Func<JsonNode?>>(rng, () => "bert", () => "OPT", () => "", () => "opt ", () => null, () => 1, () => "vit")()); break;
            case "cfg-activation": Set(j, "activation_function", Pick<Func<JsonNode?>>(rng, () => "gelu", () => "relu6", () => null, () => 3, () => "RELU")()); break;
            case "cfg-enable-bias-false": Set(j, "enable_bias", false); break;
            case "cfg-ln-affine-false": Set(j, "layer_norm_elementwise_affine", false); break;
            case "cfg-heads-not-dividing": Set(j, "num_attention_heads", Pick(rng, 3, 5, 7, 9, 16)); break;
            case "cfg-width-lists":
                Set(j, Pick(rng, "ffn_dims", "num_heads_per_layer"), Pick<Func<JsonNode?>>(rng,
                    () => new JsonArray(4), () => new JsonArray(4, 4, 4), () => new JsonArray(0, 4), () => new JsonArray(-1, 4), () => new JsonArray("4", 4),
                    () => new JsonArray(4.5, 4), () => new JsonObject(), () => "4,4", () => new JsonArray(int.MaxValue, 1), () => new JsonArray(1L << 40, 1),
                    () => new JsonArray(8, 8), () => new JsonArray(null, 1))());
                break;
            case "cfg-duplicate-key":
                {
                    string f = Pick(rng, AllFields);
                    string v = Pick(rng, "1", "\"opt\"", "null", "[]", "-5", "2147483648", "true");
                    Note($"duplicate {f}={v}");
                    c.Edits.Add(b => Insert(b, 1, Utf8($"\"{f}\": {v},")));
                }
                break;
            case "cfg-non-utf8": c.Edits.Add(b => InsertBadUtf8(b, rng)); break;
            case "cfg-truncated": c.Edits.Add(b => b[..rng.Next(b.Length)]); break;
            case "cfg-deep":
                {
                    int depth = NestDepth(rng);
                    bool balanced = rng.NextDouble() < 0.7;
                    c.Edits.Add(b => Insert(b, 1, Utf8($"\"deep\": {Nest(rng, depth, balanced)},")));
                }
                break;
            case "cfg-not-object": c.Edits.Add(_ => Utf8(Pick(rng, "[]", "null", "\"opt\"", "1", "[{\"model_type\":\"opt\"}]", " "))); break;
            case "cfg-byte-flips":
                {
                    int flips = rng.Next(1, 6);
                    c.Edits.Add(b => Flip(b, rng, 0, b.Length, flips));
                }
                break;
            case "cfg-bom": c.Edits.Add(b => Insert(b, 0, new byte[] { 0xEF, 0xBB, 0xBF })); break;
            case "cfg-float-for-int": Set(j, intField, JsonValue.Create(Pick(rng, 8.0, 8.5, 1e1, -0.0))); break;
            case "cfg-bool-fields": Set(j, Pick(rng, BoolFields), Pick<Func<JsonNode?>>(rng, () => "true", () => 1, () => 0, () => null, () => new JsonArray(true), () => false)()); break;
            case "cfg-plausible-edit":
                Set(j, intField, Pick(rng, 1, 2, 4, 16, 17, 32, 1000, 65536));
                break;
            case "cfg-empty-file": c.Edits.Add(_ => Array.Empty<byte>()); break;
            default: throw new InvalidOperationException($"unknown config mutation {m}");
        }
    }

    // ------------------------------------------------------------------ whole OPT model directories

    sealed class ModelBuild
    {
        public string Prefix = "model.decoder.";
        public string DType = "F32";
        public int Vocab = V, Hidden = H, Heads = NHeads, Layers = NLayers, MaxPositions = MaxPos;
        public int[] FfnDims = Enumerable.Repeat(Ffn, NLayers).ToArray();
        public bool Tied = true, WriteHead;
        public readonly CfgBuild Config;
        public readonly List<Action<List<StTensor>>> TensorEdits = new();
        public readonly List<Action<CkBuild>> CheckpointEdits = new();
        public int Shards = 1;
        readonly Random _rng;

        public ModelBuild(Random rng)
        {
            _rng = rng;
            Config = new CfgBuild(TinyConfig(rng));
            if (rng.NextDouble() < 0.25) Shards = rng.Next(2, 4);
        }

        public List<StTensor> Tensors()
        {
            // Names and shapes from the one OPT layout list (LlmSnp.Benchmarks.OptCheckpoints), under this case's prefix.
            var shape = new OptShape("fuzz", Layers, Hidden, Heads, FfnDims.Max(), Vocab, MaxPositions);
            var t = OptCheckpoints.Layout(shape, FfnDims)
                .Select(x => MakeTensor(_rng, Prefix + x.Name[OptCheckpoints.Prefix.Length..], DType, x.Shape)).ToList();
            if (WriteHead) t.Add(MakeTensor(_rng, "lm_head.weight", DType, Vocab, Hidden));
            return t;
        }

        public void Write(string dir)
        {
            var tensors = Tensors();
            foreach (var e in TensorEdits) e(tensors);
            var ck = new CkBuild(tensors, Shards);
            foreach (var e in CheckpointEdits) e(ck);
            ck.Write(dir);
            File.WriteAllBytes(Path.Combine(dir, "config.json"), Config.Bytes());
        }
    }

    static void MutateModel(ModelBuild mb, string m, Random rng)
    {
        var cfg = mb.Config.Json;
        switch (m)
        {
            case "model-valid": break;
            case "model-transposed":
                mb.TensorEdits.Add(ts =>
                {
                    var twoD = ts.Where(t => t.Shape.Length == 2 && t.Shape[0] != t.Shape[1]).ToList();
                    var v = twoD[rng.Next(twoD.Count)];
                    v.Shape = new[] { v.Shape[1], v.Shape[0] };   // same bytes, wrong orientation
                });
                break;
            case "model-missing-tensor": mb.TensorEdits.Add(ts => ts.RemoveAt(rng.Next(ts.Count))); break;
            case "model-extra-tensor": mb.TensorEdits.Add(ts => ts.Add(MakeTensor(rng, "model.decoder.layers.99.fc1.weight", "F32", 2, 2))); break;
            case "model-decoder-prefix": mb.Prefix = "decoder."; break;
            case "model-untied-head": mb.Tied = false; mb.WriteHead = true; cfg["tie_word_embeddings"] = false; break;
            case "model-untied-without-head": cfg["tie_word_embeddings"] = false; break;
            case "model-huge-vocab": Set(cfg, "vocab_size", Pick(rng, 1 << 30, int.MaxValue, 50272 * 64, 1 << 24)); break;
            case "model-huge-hidden":
                {
                    int h = Pick(rng, 1 << 30, int.MaxValue - 1, 1 << 24);
                    Set(cfg, "hidden_size", h); Set(cfg, "word_embed_proj_dim", h);
                }
                break;
            case "model-huge-ffn": Set(cfg, "ffn_dim", Pick(rng, 1 << 30, int.MaxValue, 1 << 24)); break;
            case "model-huge-layers": Set(cfg, "num_hidden_layers", Pick(rng, 1000, 1 << 20, int.MaxValue)); break;
            case "model-huge-positions": Set(cfg, "max_position_embeddings", Pick(rng, int.MaxValue, int.MaxValue - 1, 1 << 30)); break;
            case "model-int-dtype":
                mb.TensorEdits.Add(ts =>
                {
                    var v = ts[rng.Next(ts.Count)];
                    v.DType = "I32";   // same byte size: a valid file with integer weights
                });
                break;
            case "model-fewer-layers": cfg["num_hidden_layers"] = 1; break;
            case "model-post-ln": cfg["do_layer_norm_before"] = false; break;
            case "model-proj-dim": cfg["word_embed_proj_dim"] = Pick(rng, 4, 16, 1 << 30); break;
            case "model-pruned-widths-consistent":
                mb.FfnDims = new[] { 5, 11 };
                cfg["pruned"] = true;
                cfg["ffn_dims"] = new JsonArray(5, 11);
                cfg["num_heads_per_layer"] = new JsonArray(NHeads, NHeads);
                break;
            case "model-pruned-widths-inconsistent":
                cfg["pruned"] = true;
                cfg["ffn_dims"] = new JsonArray(5, 11);
                break;
            case "model-half-dtype": mb.DType = Pick(rng, "F16", "BF16", "F64"); break;
            case "model-config-edit":
                MutateConfig(mb.Config, ConfigMutations[rng.Next(ConfigMutations.Length)], rng);
                break;
            case "model-weights-edit":
                {
                    string fm = FileMutations[rng.Next(FileMutations.Length)];
                    mb.CheckpointEdits.Add(ck => MutateFile(ck.Shards[rng.Next(ck.Shards.Count)], fm, rng));
                }
                break;
            case "model-sharded-edit":
                mb.Shards = rng.Next(2, 4);
                {
                    string im = IndexMutations[rng.Next(IndexMutations.Length)];
                    mb.CheckpointEdits.Add(ck => MutateCheckpoint(ck, im, rng));
                }
                break;
            default: throw new InvalidOperationException($"unknown model mutation {m}");
        }
    }
}
