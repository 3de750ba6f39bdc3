using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Evaluation.Tasks;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Benchmarks;

/// <summary>
/// The bundled GPT-2 byte-level BPE (OPT's) with its ids folded into a random checkpoint's vocabulary: request lengths
/// and shared contexts as a real ~50k-entry English BPE gives them (close to LLaMA's 32k SentencePiece), where the
/// synthetic vocabulary of a bench checkpoint would spell every character as a byte.
/// </summary>
public sealed class FoldedBpeTokenizer : ITextTokenizer
{
    readonly OptTokenizer _bpe = OptTokenizer.Bundled();
    readonly int _vocab;
    public FoldedBpeTokenizer(int vocab) { _vocab = vocab; }
    public string Description => $"bundled GPT-2 BPE, ids mod {_vocab}";
    public int? BosId => OptTokenizer.BosId % _vocab;
    public int? EosId => OptTokenizer.BosId % _vocab;
    public int[] Encode(string text) => _bpe.Encode(text).Select(i => i % _vocab).ToArray();
    public int[] EncodeWithoutSpecialTokens(string text) => _bpe.EncodeWithoutSpecialTokens(text).Select(i => i % _vocab).ToArray();
    public string Decode(IEnumerable<int> ids) => _bpe.Decode(ids);
}

/// <summary>
/// `bench --tasks`: zero-shot task throughput on a random-weight model of a released shape: requests/s, tokens/s and
/// the fraction of this machine's GEMM peak, counting the matmul FLOPs of the real (unpadded) tokens, the attention
/// pairs each row reads and the head at the scored positions.
/// </summary>
public static class TaskBench
{
    public static JsonObject Run(BenchOptions o, Action<string>? log)
    {
        var s = o.Shape;
        var peaks = new JsonArray();
        double MeasurePeak(string when)
        {
            double p = Math.Max(Bench.MatmulPeak(2048), Bench.MatmulPeak(4096, 3));
            peaks.Add(p / 1e9);
            log?.Invoke($"matmul peak (F32, {when}): {p / 1e9:F1} GFLOP/s");
            return p;
        }
        double peak = MeasurePeak("start");
        var sets = TaskCatalog.Load(o.Tasks!, o.TaskLimit);
        string dir = Path.Combine(o.WorkDir, $"llmsnp-bench-tasks-{s.Name}-{s.Layers}l-{Guid.NewGuid():N}");
        StagingDirectory.Track(dir);
        try
        {
            var sw = System.Diagnostics.Stopwatch.StartNew();
            s.WriteRandom(dir, ScalarType.Float16, seed: 0);
            log?.Invoke($"random {s.Name} ({s.Layers} layers) written in {sw.Elapsed.TotalSeconds:F0}s");
            TaskRun run;
            long anon;
            using (var mem = new MemoryMonitor())
            using (var model = ModelFamilies.OpenLanguageModel(dir))
            {
                run = TaskEvalJob.Evaluate(model, new FoldedBpeTokenizer(s.Vocab), sets, BosPolicy.Auto, log);
                anon = mem.PeakAnonBytes;
            }
            peak = Math.Max(peak, MeasurePeak("after the evaluation"));
            var e = run.Encoded;
            long pairs = e.Rows.Sum(r => r.AttendedPairs), scored = e.Rows.Sum(r => r.Scored.Sum(x => (long)x.Targets.Length));
            double linear = s.BlockFlopsPerToken(0), perPair = s.BlockFlopsPerToken(2) - linear;
            double flops = e.Tokens * linear + pairs * perPair + scored * s.HeadFlopsPerToken;
            double gflops = flops / run.ForwardSeconds / 1e9;
            log?.Invoke($"tasks: {run.RequestsPerSecond:F2} requests/s, {run.TokensPerSecond:F0} tokens/s, {gflops:F1} GFLOP/s = {gflops * 1e9 / peak:P0} of peak");
            return new JsonObject
            {
                ["machine"] = new JsonObject
                {
                    ["cores"] = Environment.ProcessorCount, ["os"] = System.Runtime.InteropServices.RuntimeInformation.OSDescription,
                    ["matmul_peak_gflops_f32"] = peak / 1e9, ["matmul_peak_samples_gflops_f32"] = peaks,
                },
                ["date"] = DateTime.UtcNow.ToString("yyyy-MM-dd"),
                ["shape"] = s.Describe(),
                ["dtype_on_disk"] = "float16",
                ["tokenizer"] = "bundled GPT-2 BPE with ids folded into the shape's vocabulary (random weights: the scores are chance)",
                ["tasks"] = new JsonObject
                {
                    ["docs"] = new JsonObject(sets.Select(t => KeyValuePair.Create(t.Name, (JsonNode?)t.Docs.Count))),
                    ["requests"] = e.Requests, ["tokens"] = e.Tokens, ["tokens_one_forward_per_request"] = e.UnsharedTokens,
                    ["padded_tokens"] = run.PaddedTokens, ["attended_pairs"] = pairs, ["scored_tokens"] = scored, ["groups"] = run.Groups,
                    ["tokenize_seconds"] = run.TokenizeSeconds, ["forward_seconds"] = run.ForwardSeconds,
                    ["requests_per_second"] = run.RequestsPerSecond, ["tokens_per_second"] = run.TokensPerSecond,
                    ["gflops"] = gflops, ["fraction_of_peak"] = gflops * 1e9 / peak,
                    ["flops_counted"] = "matmuls of the unpadded tokens through the blocks, 4·width per attended (query, key) pair and layer, the head at scored positions",
                    ["peak_anon_rss_bytes"] = anon,
                },
            };
        }
        finally
        {
            if (Directory.Exists(dir)) Directory.Delete(dir, true);
            StagingDirectory.Release(dir);
        }
    }
}
