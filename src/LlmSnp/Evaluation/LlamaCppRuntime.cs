using System.Diagnostics;
using System.Text.Json.Nodes;
using LLama;
using LLama.Common;
using LLama.Native;

namespace LlmSnp.Evaluation;

public sealed record LlamaCppPerplexity(string Model, int SeqLen, int Windows, long Predictions, double MeanNll, double Perplexity,
    double Seconds, double TokensPerSecond)
{
    public JsonObject ToJson() => new()
    {
        ["model"] = Model, ["seqlen"] = SeqLen, ["windows"] = Windows, ["predictions"] = Predictions, ["mean_nll"] = MeanNll,
        ["perplexity"] = Perplexity, ["seconds"] = Math.Round(Seconds, 3), ["tokens_per_second"] = Math.Round(TokensPerSecond, 1),
    };
}

public sealed record LlamaCppSpeed(string Model, int Threads, int PrefillTokens, double PrefillTokensPerSecond, int DecodeTokens,
    double DecodeMsPerToken, IReadOnlyList<int> GreedyIds)
{
    public JsonObject ToJson() => new()
    {
        ["model"] = Model, ["threads"] = Threads, ["prefill_tokens"] = PrefillTokens, ["prefill_tokens_per_second"] = Math.Round(PrefillTokensPerSecond, 1),
        ["decode_tokens"] = DecodeTokens, ["decode_ms_per_token"] = Math.Round(DecodeMsPerToken, 3),
    };
}

/// <summary>
/// A GGUF file loaded in llama.cpp itself (through LLamaSharp, CPU backend), to check that an
/// exported file computes what the checkpoint does and to measure its speed. Token ids go in
/// directly, so the numbers depend on the weights and the graph, not on llama.cpp's tokenizer.
/// </summary>
public sealed class LlamaCppRuntime : IDisposable
{
    static readonly object LogLock = new();
    static NativeLogConfig.LLamaLogCallback? _callback;   // held so the native side never calls a collected delegate
    static readonly Queue<string> RecentErrors = new();

    /// <summary>llama.cpp logs every load to stderr by default: keep only errors, for the exception message.</summary>
    static void QuietLogs()
    {
        lock (LogLock)
        {
            if (_callback != null) return;
            _callback = (level, message) =>
            {
                if (level != LLamaLogLevel.Error) return;
                lock (RecentErrors)
                {
                    RecentErrors.Enqueue(message.Trim());
                    while (RecentErrors.Count > 4) RecentErrors.Dequeue();
                }
            };
            // Before the native library loads, the config routes its load-time messages too; after, set it directly.
            if (NativeLibraryConfig.LLama.LibraryHasLoaded) NativeLogConfig.llama_log_set(_callback);
            else NativeLibraryConfig.All.WithLogCallback(_callback);
        }
    }

    static string LastErrors()
    {
        lock (RecentErrors) return RecentErrors.Count == 0 ? "no message from llama.cpp" : string.Join("; ", RecentErrors.Where(s => s.Length > 0));
    }

    public string Path { get; }
    public int Threads { get; }
    public int ContextSize { get; }
    public int VocabSize { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }
    readonly LLamaWeights _weights;
    readonly LLamaContext _context;

    LlamaCppRuntime(string path, int threads, int contextSize, LLamaWeights weights, LLamaContext context)
    {
        Path = path; Threads = threads; ContextSize = contextSize; _weights = weights; _context = context;
        VocabSize = weights.Vocab.Count;
        Metadata = weights.Metadata;
    }

    /// <summary>
    /// Loads a GGUF on the CPU with a context (and batch) of <paramref name="contextSize"/> tokens,
    /// with llama.cpp's own defaults otherwise (what its users run). Those defaults compute attention
    /// partly in F16 (K/V cached in F16, flash attention chosen automatically on CPU): measured here,
    /// up to 5e-4 relative perplexity on an F32 file. <paramref name="f32Attention"/> caches K and V in
    /// F32 and turns flash attention off, so an F32 file is computed in F32 throughout (≈1e-7).
    /// </summary>
    public static LlamaCppRuntime Load(string path, int contextSize, int threads = 2, bool f32Attention = false)
    {
        if (!File.Exists(path)) throw new LlmSnpException($"{path}: file not found");
        if (contextSize < 2) throw new LlmSnpException($"llama.cpp context size {contextSize} is below 2");
        QuietLogs();
        var p = new ModelParams(path)
        {
            ContextSize = (uint)contextSize, BatchSize = (uint)contextSize, UBatchSize = (uint)contextSize,
            Threads = threads, BatchThreads = threads, GpuLayerCount = 0,
        };
        if (f32Attention)
        {
            p.TypeK = GGMLType.GGML_TYPE_F32;
            p.TypeV = GGMLType.GGML_TYPE_F32;
            p.FlashAttention = false;
        }
        LLamaWeights weights;
        try { weights = LLamaWeights.LoadFromFile(p); }
        catch (Exception e) when (e is not LlmSnpException)
        {
            throw new LlmSnpException($"{path}: llama.cpp could not load it ({LastErrors()})", e);
        }
        try
        {
            var ctx = weights.CreateContext(p);
            return new LlamaCppRuntime(path, threads, contextSize, weights, ctx);
        }
        catch (Exception e) when (e is not LlmSnpException)
        {
            weights.Dispose();
            throw new LlmSnpException($"{path}: llama.cpp could not create a context of {contextSize} tokens ({LastErrors()})", e);
        }
    }

    void Decode(LLamaBatch batch, string what)
    {
        var r = _context.NativeHandle.Decode(batch);
        if (r != DecodeResult.Ok) throw new LlmSnpException($"{Path}: llama.cpp decode of {what} failed: {r} ({LastErrors()})");
    }

    /// <summary>
    /// Perplexity with LlmSnp's protocol: non-overlapping windows of <paramref name="seqLen"/> from
    /// position 0, tail dropped, each window its own forward from position 0 (cache cleared), all
    /// logits; mean NLL over the seqLen − 1 next-token predictions of every window; ppl = exp(mean).
    /// Log-softmax is taken in float64 over llama.cpp's float32 logits.
    /// </summary>
    public LlamaCppPerplexity Perplexity(IReadOnlyList<int> ids, int seqLen, int? maxWindows = null, Action<string>? log = null)
    {
        if (seqLen < 2 || seqLen > ContextSize) throw new LlmSnpException($"seqlen {seqLen} must be in [2, {ContextSize}] (the llama.cpp context)");
        int windows = ids.Count / seqLen;
        if (maxWindows is int m) windows = Math.Min(windows, m);
        if (windows < 1) throw new LlmSnpException($"{ids.Count} tokens do not fill one window of {seqLen}");
        foreach (var id in ids.Take(windows * seqLen))
            if (id < 0 || id >= VocabSize) throw new LlmSnpException($"token id {id} is outside the model's vocabulary of {VocabSize}");
        var sw = Stopwatch.StartNew();
        double nll = 0;
        long count = 0;
        var batch = new LLamaBatch();
        for (int w = 0; w < windows; w++)
        {
            _context.NativeHandle.MemoryClear(true);
            batch.Clear();
            int off = w * seqLen;
            for (int t = 0; t < seqLen; t++) batch.Add(ids[off + t], t, LLamaSeqId.Zero, t < seqLen - 1);
            Decode(batch, $"window {w}");
            for (int t = 0; t < seqLen - 1; t++)
            {
                var logits = _context.NativeHandle.GetLogitsIth(t);
                double max = double.NegativeInfinity;
                foreach (var x in logits) if (x > max) max = x;
                double sum = 0;
                foreach (var x in logits) sum += Math.Exp(x - max);
                nll += max + Math.Log(sum) - logits[ids[off + t + 1]];
                count++;
            }
            log?.Invoke($"llama.cpp ppl: window {w + 1}/{windows}");
        }
        double mean = nll / count;
        double s = sw.Elapsed.TotalSeconds;
        return new LlamaCppPerplexity(Path, seqLen, windows, count, mean, Math.Exp(mean), s, windows * (double)seqLen / s);
    }

    /// <summary>
    /// Prefill throughput (one batch of <paramref name="prefillTokens"/> ids from position 0, logits of
    /// the last only, best of <paramref name="repeats"/>), then batch-1 greedy decoding of
    /// <paramref name="decodeTokens"/> tokens on the KV cache, in ms per token.
    /// </summary>
    public LlamaCppSpeed Speed(IReadOnlyList<int> prompt, int prefillTokens, int decodeTokens, int repeats = 2)
    {
        if (prefillTokens < 1 || prompt.Count < prefillTokens) throw new LlmSnpException($"prefill needs {prefillTokens} prompt tokens, got {prompt.Count}");
        if (prefillTokens + decodeTokens > ContextSize) throw new LlmSnpException($"prefill {prefillTokens} + decode {decodeTokens} exceed the llama.cpp context of {ContextSize}");
        var batch = new LLamaBatch();
        double best = double.PositiveInfinity;
        for (int r = 0; r < Math.Max(1, repeats); r++)
        {
            _context.NativeHandle.MemoryClear(true);
            batch.Clear();
            for (int t = 0; t < prefillTokens; t++) batch.Add(prompt[t], t, LLamaSeqId.Zero, t == prefillTokens - 1);
            var sw = Stopwatch.StartNew();
            Decode(batch, "prefill");
            best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        var greedy = new List<int>();
        int last = prefillTokens - 1;   // batch index of the logits to read
        var dsw = Stopwatch.StartNew();
        for (int k = 0; k < decodeTokens; k++)
        {
            var logits = _context.NativeHandle.GetLogitsIth(last);
            int arg = 0;
            for (int v = 1; v < logits.Length; v++) if (logits[v] > logits[arg]) arg = v;
            greedy.Add(arg);
            batch.Clear();
            batch.Add(arg, prefillTokens + k, LLamaSeqId.Zero, true);
            Decode(batch, $"decode step {k}");
            last = 0;
        }
        double decodeMs = decodeTokens == 0 ? 0 : dsw.Elapsed.TotalMilliseconds / decodeTokens;
        return new LlamaCppSpeed(Path, Threads, prefillTokens, prefillTokens / best, decodeTokens, decodeMs, greedy);
    }

    /// <summary>Logits of every position of one forward from position 0 (for direct comparisons).</summary>
    public float[][] Logits(IReadOnlyList<int> ids)
    {
        if (ids.Count < 1 || ids.Count > ContextSize) throw new LlmSnpException($"{ids.Count} tokens do not fit the llama.cpp context of {ContextSize}");
        _context.NativeHandle.MemoryClear(true);
        var batch = new LLamaBatch();
        for (int t = 0; t < ids.Count; t++) batch.Add(ids[t], t, LLamaSeqId.Zero, true);
        Decode(batch, "logits");
        return Enumerable.Range(0, ids.Count).Select(t => _context.NativeHandle.GetLogitsIth(t).ToArray()).ToArray();
    }

    /// <summary>
    /// llama.cpp's own tokenizer on the file's vocabulary (checks the exported tokenizer metadata). With
    /// <paramref name="special"/> control tokens written in the text are matched too (llama.cpp makes some control
    /// tokens by name, e.g. Gemma's &lt;end_of_turn&gt;, whatever the file says).
    /// </summary>
    public int[] Tokenize(string text, bool addBos, bool special = false) =>
        _context.Tokenize(text, addBos, special).Select(t => (int)t).ToArray();

    public void Dispose()
    {
        _context.Dispose();
        _weights.Dispose();
    }
}
