using TorchSharp;
using System.Diagnostics;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Evaluation;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Benchmarks;

public sealed record BenchOptions
{
    public required IBenchShape Shape { get; init; }
    public int EvalWindows { get; init; } = 4;
    public int SeqLen { get; init; } = 2048;
    public int CalibSamples { get; init; } = 32;
    public string WorkDir { get; init; } = Path.GetTempPath();
    public bool SkipEval { get; init; }
    public bool KeepModel { get; init; }
    /// <summary>The pruning run's ordering: zca (default) or a cheaper one where a width's eigendecomposition would take hours.</summary>
    public Ordering Ordering { get; init; } = Ordering.Zca;
    /// <summary>Fraction of prunable parameters removed (uniform ratio over MLP neurons and heads / K/V groups).</summary>
    public double Ratio { get; init; } = 0.2;
    /// <summary>Decode steps of the llama.cpp speed runs (LLaMA family).</summary>
    public int DecodeSteps { get; init; } = 8;
    /// <summary>llama.cpp prefill length (a 2048-token prefill of a 7B model takes many minutes on 2 cores).</summary>
    public int LlamaCppPrefill { get; init; } = 512;
    public int WidthMultiple { get; init; } = 1;
    /// <summary>Only the evaluation and llama.cpp's dense speed.</summary>
    public bool SkipPrune { get; init; }
    /// <summary>Mixtures: experts every sparse layer keeps in the pruning run (null: all).</summary>
    public ExpertOptions? Experts { get; init; }
    /// <summary>Equal widths in every layer (llama.cpp's mixture architectures need them).</summary>
    public bool UniformWidths { get; init; }
    /// <summary>Zero-shot task throughput instead (<see cref="TaskBench"/>): comma-separated tasks, the first <see cref="TaskLimit"/> documents of each.</summary>
    public string? Tasks { get; init; }
    public int? TaskLimit { get; init; }
}

/// <summary>
/// `llmsnp bench`: this machine's GEMM peak, then perplexity throughput and pruning time of a
/// random-weight model of a released shape (OPT or LLaMA family), each against that peak, with peak anonymous memory.
/// </summary>
public static class Bench
{
    /// <summary>Best-of-N F32 GEMM throughput in FLOP/s (2n³ per n×n product).</summary>
    public static double MatmulPeak(int n = 2048, int repeats = 6)
    {
        using var scope = NewDisposeScope();
        var a = torch.randn(n, n); var b = torch.randn(n, n);
        a.mm(b).Dispose();   // warm-up
        double best = double.MaxValue;
        for (int i = 0; i < repeats; i++)
        {
            var sw = Stopwatch.StartNew();
            using var c = a.mm(b);
            best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        return 2.0 * n * n * n / best;
    }

    public static JsonObject Run(BenchOptions o, Action<string>? log)
    {
        if (o.Tasks != null) return TaskBench.Run(o, log);
        var s = o.Shape;
        // The peak is measured before and again after the evaluation, and the higher one counts: this
        // machine's GEMM speed drifts by ±15 % over minutes, and a peak caught low would flatter the fraction.
        var peaks = new JsonArray();
        double MeasurePeak(string when)
        {
            double p = Math.Max(MatmulPeak(2048), MatmulPeak(4096, 3));
            peaks.Add(p / 1e9);
            log?.Invoke($"matmul peak (F32, {when}): {p / 1e9:F1} GFLOP/s");
            return p;
        }
        double peak = MeasurePeak("start");
        string dir = Path.Combine(o.WorkDir, $"llmsnp-bench-{s.Name}-{s.Layers}l-{Guid.NewGuid():N}");
        if (!o.KeepModel) StagingDirectory.Track(dir);   // a signal removes the random checkpoint (tens of GB) too
        var result = new JsonObject
        {
            ["machine"] = new JsonObject
            {
                ["cores"] = Environment.ProcessorCount, ["os"] = System.Runtime.InteropServices.RuntimeInformation.OSDescription,
                ["matmul_peak_gflops_f32"] = peak / 1e9, ["matmul_peak_samples_gflops_f32"] = peaks,
            },
            ["date"] = DateTime.UtcNow.ToString("yyyy-MM-dd"),
            ["shape"] = s.Describe(),
            ["dtype_on_disk"] = SafeDTypes.ConfigName(s.DiskDType),
        };
        try
        {
            var sw = Stopwatch.StartNew();
            s.WriteRandom(dir, s.DiskDType, seed: 0);
            long fileBytes = Directory.GetFiles(dir, "*.safetensors").Sum(f => new FileInfo(f).Length);
            result["checkpoint_bytes"] = fileBytes;
            result["generate_seconds"] = sw.Elapsed.TotalSeconds;
            log?.Invoke($"random {s.Name} ({s.Layers} layers) written: {fileBytes / 1e9:F2} GB in {sw.Elapsed.TotalSeconds:F0}s");
            var rng = new Random(0);
            LlamaCppSpeed? denseCpp = null;
            int seq = Math.Min(o.SeqLen, s.MaxPositions);
            int cppPrefill = Math.Min(o.LlamaCppPrefill, seq);
            if (!o.SkipEval)
            {
                var ids = Enumerable.Range(0, o.EvalWindows * seq).Select(_ => rng.Next(3, s.Vocab)).ToArray();
                using var mem = new MemoryMonitor();
                using var model = ModelFamilies.OpenLanguageModel(dir);
                var r = Perplexity.Evaluate(model, ids, seq, null, "random ids", log);
                long evalPeakAnon = mem.PeakAnonBytes;
                peak = Math.Max(peak, MeasurePeak("after the evaluation"));
                result["machine"]!["matmul_peak_gflops_f32"] = peak / 1e9;
                double flops = r.Tokens * (s.BlockFlopsPerToken(seq) + s.HeadFlopsPerToken);
                result["eval"] = new JsonObject
                {
                    ["windows"] = r.Windows, ["seqlen"] = seq, ["tokens"] = r.Tokens, ["seconds"] = r.Seconds,
                    ["tokens_per_second"] = r.TokensPerSecond, ["gflops"] = flops / r.Seconds / 1e9,
                    ["fraction_of_peak"] = flops / r.Seconds / peak,
                    ["peak_anon_rss_bytes"] = evalPeakAnon, ["bytes_read"] = model.BytesRead,
                };
                log?.Invoke($"eval: {r.TokensPerSecond:F0} tokens/s, {flops / r.Seconds / 1e9:F1} GFLOP/s = {flops / r.Seconds / peak:P0} of peak");
            }
            if (ModelFamilies.Of(dir).Gguf is not null)
            {
                // The strongest CPU engine a user would pick, on the same weights (F16), prefilling the same length.
                var (cpp, skipped) = InferenceBench.LlamaCpp(dir, Export.GgufDType.F16, cppPrefill, o.DecodeSteps, s.Vocab, log);
                denseCpp = cpp;
                double? own = result["eval"]?["tokens_per_second"]?.GetValue<double>();
                result["llama_cpp"] = new JsonObject
                {
                    ["dense"] = cpp?.ToJson(), ["skipped"] = skipped,
                    ["llmsnp_eval_over_llama_cpp_prefill"] = cpp is null || own is null ? null : own / cpp.PrefillTokensPerSecond,
                    ["note"] = $"LlmSnp evaluates {seq}-token windows; llama.cpp prefills {cppPrefill} tokens",
                };
            }
            if (!o.SkipPrune)
            {
                var calib = Enumerable.Range(0, o.CalibSamples)
                    .Select(_ => torch.tensor(Enumerable.Range(0, seq).Select(_ => (long)rng.Next(3, s.Vocab)).ToArray(), new long[] { 1, seq })).ToList();
                using var mem = new MemoryMonitor();
                using var model = ModelFamilies.OpenLanguageModel(dir);
                string outDir = dir + "-pruned";
                StagingDirectory.Track(outDir);
                var report = PrunedCheckpoint.Write(new PrunedCheckpoint.Request
                {
                    Model = model, Options = new PruneOptions
                    {
                        Ordering = o.Ordering, Policy = RatioPolicyKind.Ratio, Amount = o.Ratio, WidthMultiple = o.WidthMultiple,
                        Experts = o.Experts, UniformWidths = o.UniformWidths,
                    },
                    Calibration = calib, CalibrationInfo = new JsonObject { ["source"] = "random ids", ["samples"] = o.CalibSamples, ["seqlen"] = seq },
                    OutDir = outDir, SourceDir = dir, ParamsBefore = model.ParameterCount(),
                }, log);
                double tokens = (double)o.CalibSamples * seq;
                // The bound: one calibration forward through the blocks plus the Gram products (2·T·n² per node layer).
                double gram = 2.0 * tokens * s.GramUnitsSquared;
                double bound = (tokens * s.BlockFlopsPerToken(seq) + gram) / peak;
                double total = (double)report["seconds"]!["total"]!;
                result["prune"] = new JsonObject
                {
                    ["ordering"] = Orderings.Name(o.Ordering), ["ratio"] = o.Ratio, ["width_multiple"] = o.WidthMultiple, ["calibration_tokens"] = tokens, ["seconds"] = report["seconds"]!.DeepClone(),
                    ["experts_keep"] = o.Experts?.Describe(), ["uniform_widths"] = o.UniformWidths,
                    ["params_before"] = report["params_before"]!.DeepClone(), ["params_after"] = report["params_after"]!.DeepClone(),
                    ["active_params_before"] = report["active_params_before"]?.DeepClone(), ["active_params_after"] = report["active_params_after"]?.DeepClone(),
                    ["experts"] = report["experts"] is JsonArray ex ? new JsonArray(ex.Select(l => (JsonNode)new JsonObject
                    {
                        ["name"] = l!["name"]!.DeepClone(), ["relative_error_removed"] = l["relative_error_removed"]?.DeepClone(), ["relative_error_folded"] = l["relative_error_folded"]?.DeepClone(),
                        ["few_tokens"] = l["few_tokens"]!.AsArray().Count,
                        ["tokens_per_expert_min"] = l["tokens_per_expert"]!.AsArray().Min(t => (long)t!), ["tokens_per_expert_max"] = l["tokens_per_expert"]!.AsArray().Max(t => (long)t!),
                    }).ToArray()) : null,
                    ["flop_bound_seconds"] = bound, ["ratio_to_bound"] = total / bound,
                    ["peak_anon_rss_bytes"] = mem.PeakAnonBytes, ["peak_anon_over_file_size"] = (double)mem.PeakAnonBytes / fileBytes,
                    ["bytes_read"] = model.BytesRead,
                };
                log?.Invoke($"prune: {total:F1}s, FLOP bound {bound:F1}s ({total / bound:F2}×), peak anon RSS {mem.PeakAnonBytes / 1e9:F2} GB = {(double)mem.PeakAnonBytes / fileBytes:P0} of the F16 file");
                calib.ForEach(c => c.Dispose());
                if (denseCpp != null)
                {
                    // Pruned against dense in llama.cpp, next to the ratio of weight FLOPs per token (embeddings excluded).
                    var (cpp, skipped) = InferenceBench.LlamaCpp(outDir, Export.GgufDType.F16, cppPrefill, o.DecodeSteps, s.Vocab, log);
                    long embed = (long)report["params_before"]! - (long)report["prunable_params"]!;
                    double flopRatio = (double)((long)report["params_before"]! - embed) / ((long)report["params_after"]! - embed);
                    if (report["active_params_before"] is JsonNode activeBefore)
                    {
                        // A mixture computes top-k experts per token whatever their count: the ratio of active block parameters.
                        long outer;
                        using (var ck = new CheckpointReader(dir))
                            outer = ck.Names.Where(n => !n.StartsWith("model.layers.", StringComparison.Ordinal)).Sum(n => ck.Entry(n).Shape.Aggregate(1L, (a, b) => a * b));
                        flopRatio = (double)((long)activeBefore - outer) / ((long)report["active_params_after"]! - outer);
                    }
                    result["llama_cpp_pruned"] = new JsonObject
                    {
                        ["pruned"] = cpp?.ToJson(), ["skipped"] = skipped, ["weight_flop_ratio"] = flopRatio,
                        // Kept widths: llama.cpp's fast F16 GEMM needs the down_proj's inner (MLP) width aligned (--width-multiple).
                        ["mlp_widths_kept"] = KeptWidths(report, "mlp"), ["heads_kept"] = KeptWidths(report, "heads"), ["expert_widths_kept"] = KeptWidths(report, "experts"),
                        ["prefill_speedup"] = cpp is null ? null : cpp.PrefillTokensPerSecond / denseCpp.PrefillTokensPerSecond,
                        ["decode_speedup"] = cpp is null ? null : denseCpp.DecodeMsPerToken / cpp.DecodeMsPerToken,
                    };
                }
                if (Directory.Exists(outDir)) Directory.Delete(outDir, true);
                StagingDirectory.Release(outDir);
            }
        }
        finally
        {
            if (!o.KeepModel && Directory.Exists(dir)) Directory.Delete(dir, true);
            StagingDirectory.Release(dir);
        }
        return result;
    }

    /// <summary>The distinct kept unit counts of one node kind over the layers of a pruning report.</summary>
    static JsonArray KeptWidths(JsonObject report, string kind) =>
        new(report["layers"]!.AsArray().Where(l => (string)l!["kind"]! == kind).Select(l => (int)l!["units_kept"]!).Distinct().Select(w => (JsonNode)w).ToArray());
}

/// <summary>
/// Samples the process's anonymous resident memory (RssAnon) to find its peak over a phase. The
/// sampling thread allocates no managed memory: a garbage collection it triggered could finalize a
/// TorchSharp temporary (a Scalar) that the main thread has just handed to a native call.
/// </summary>
public sealed class MemoryMonitor : IDisposable
{
    readonly Thread _thread;
    volatile bool _stop;
    long _peak;
    public long PeakAnonBytes => Math.Max(Interlocked.Read(ref _peak), Sample());

    public MemoryMonitor()
    {
        // Free heap pages that earlier phases (GEMM peak, checkpoint generation) left with glibc,
        // so the phase is measured as a process running only it would see it.
        GC.Collect();
        GC.WaitForPendingFinalizers();
        Runtime.TrimHostHeap();
        _peak = Sample();
        _thread = new Thread(() =>
        {
            var buffer = new byte[8192];
            int fd = OperatingSystem.IsLinux() ? open("/proc/self/status", 0) : -1;
            try
            {
                while (!_stop && fd >= 0)
                {
                    long v = ReadRssAnon(fd, buffer);
                    if (v > Interlocked.Read(ref _peak)) Interlocked.Exchange(ref _peak, v);
                    Thread.Sleep(20);
                }
            }
            finally { if (fd >= 0) close(fd); }
        }) { IsBackground = true };
        _thread.Start();
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = false)]
    static extern int open([System.Runtime.InteropServices.MarshalAs(System.Runtime.InteropServices.UnmanagedType.LPUTF8Str)] string path, int flags);
    [System.Runtime.InteropServices.DllImport("libc", SetLastError = false)]
    static extern IntPtr pread(int fd, byte[] buf, UIntPtr count, IntPtr offset);
    [System.Runtime.InteropServices.DllImport("libc", SetLastError = false)]
    static extern int close(int fd);

    /// <summary>RssAnon from /proc/self/status, in bytes (0 where unavailable).</summary>
    public static long Sample()
    {
        try { return ParseRssAnon(File.ReadAllBytes("/proc/self/status")); }
        catch (IOException) { return 0; }
    }

    /// <summary>RssAnon read through an open descriptor into a reused buffer (no managed allocation).</summary>
    static long ReadRssAnon(int fd, byte[] buffer)
    {
        long n = (long)pread(fd, buffer, (UIntPtr)buffer.Length, IntPtr.Zero);
        return n > 0 ? ParseRssAnon(buffer.AsSpan(0, (int)n)) : 0;
    }

    /// <summary>
    /// The RssAnon field of a /proc/PID/status text, in bytes (0 if absent). The kernel pads the
    /// number after a tab to a fixed width, so from 10 GB on there is no space before it.
    /// </summary>
    public static long ParseRssAnon(ReadOnlySpan<byte> status)
    {
        ReadOnlySpan<byte> key = "RssAnon:"u8;
        int at = status.IndexOf(key);
        if (at < 0 || (at > 0 && status[at - 1] != (byte)'\n')) return 0;
        long kb = 0;
        int i = at + key.Length, digits = 0;
        while (i < status.Length && (status[i] == (byte)' ' || status[i] == (byte)'\t')) i++;
        for (; i < status.Length && status[i] >= (byte)'0' && status[i] <= (byte)'9'; i++, digits++) kb = kb * 10 + (status[i] - '0');
        return digits > 0 ? kb * 1024 : 0;
    }

    public void Dispose()
    {
        _stop = true;
        _thread.Join();
    }
}
