using System.Diagnostics;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Evaluation.Tasks;

/// <summary>One model's task evaluation: the encoded requests, their results, the scores and what it cost.</summary>
public sealed record TaskRun(string Model, EncodedTasks Encoded, TaskResults Results, TaskSummary Summary, long Parameters, string DType, string ComputeDType,
    double TokenizeSeconds, double ForwardSeconds, long PaddedTokens, int Groups)
{
    public double Seconds => TokenizeSeconds + ForwardSeconds;
    public double RequestsPerSecond => Encoded.Requests / Math.Max(Seconds, 1e-9);
    public double TokensPerSecond => Encoded.Tokens / Math.Max(ForwardSeconds, 1e-9);

    public JsonObject ToJson() => new()
    {
        ["model"] = Model,
        ["tasks"] = Summary.TasksJson(),
        ["mean"] = Summary.MeanJson(),
        ["add_bos"] = BosPolicies.Name(Encoded.Bos),
        ["prefix_token_id"] = Encoded.PrefixTokenId,
        ["max_length"] = Encoded.MaxLength,
        ["requests"] = Encoded.Requests,
        ["truncated_requests"] = Encoded.Truncated,
        ["tokens"] = Encoded.Tokens,
        ["tokens_one_forward_per_request"] = Encoded.UnsharedTokens,
        ["padded_tokens"] = PaddedTokens,
        ["groups"] = Groups,
        ["parameters"] = Parameters, ["dtype"] = DType, ["compute_dtype"] = ComputeDType,
        ["tokenize_seconds"] = TokenizeSeconds, ["forward_seconds"] = ForwardSeconds, ["seconds"] = Seconds,
        ["requests_per_second"] = RequestsPerSecond, ["tokens_per_second"] = TokensPerSecond,
    };
}

/// <summary>`llmsnp eval tasks`: lm-eval-compatible zero-shot accuracy, streamed block by block.</summary>
public static class TaskEvalJob
{
    /// <summary>Hidden states held per group of rows (bytes); each block is read once per group.</summary>
    public const long GroupHiddenBytes = 1L << 30;

    /// <summary>`--eval tasks:a,b` of prune and compare: the task list, or null for another evaluation.</summary>
    public static string? TaskList(string? eval) =>
        eval is string e && e.StartsWith("tasks:", StringComparison.Ordinal) ? e["tasks:".Length..] : null;

    public static JsonObject Run(string modelDir, string tasks, int? limit, BosPolicy bos, string? logSamples, Device device, ScalarType dtype, Action<string>? log)
    {
        using var model = ModelFamilies.OpenLanguageModel(modelDir, device, dtype, "eval tasks");
        var sets = TaskCatalog.Load(tasks, limit);
        var run = Evaluate(model, model.Tokenizer(), sets, bos, log);
        // Written only once everything is scored: a failure leaves nothing behind.
        if (logSamples != null) AtomicFile.WriteAllText(logSamples, TaskScoring.LogSamples(run.Encoded, run.Results));
        return run.ToJson();
    }

    /// <summary>The token id an empty context becomes where the tokenizer names neither bos nor eos: config.json's eos, else its bos.</summary>
    public static int? ConfigPrefixToken(string modelDir)
    {
        var json = ConfigFile.Load(modelDir).Json;
        foreach (var field in new[] { "eos_token_id", "bos_token_id" })
        {
            var node = json[field];
            if (node is JsonArray a && a.Count > 0) node = a[0];
            if (node is JsonValue v && v.TryGetValue<int>(out int id) && id >= 0) return id;
        }
        return null;
    }

    /// <summary>Encodes the tasks with <paramref name="tokenizer"/> and streams them through the model in groups bounded by <see cref="GroupHiddenBytes"/>.</summary>
    public static TaskRun Evaluate(ILanguageModel model, ITextTokenizer tokenizer, IReadOnlyList<TaskSet> sets, BosPolicy bos, Action<string>? log)
    {
        var sw = Stopwatch.StartNew();
        var encoded = EncodedTasks.Encode(sets, tokenizer, model.MaxPositions, bos, ConfigPrefixToken(model.ModelDir));
        double tokenize = sw.Elapsed.TotalSeconds;
        log?.Invoke($"{string.Join(", ", sets.Select(s => $"{s.Name} {s.Docs.Count}"))} docs: {encoded.Requests} requests, {encoded.Tokens} tokens "
            + $"({encoded.UnsharedTokens} without shared contexts), {encoded.Truncated} cut to the context of {encoded.MaxLength}; tokenized in {tokenize:F1}s");
        long bytesPerToken;
        using (var probe = model.Embed(torch.zeros(1, 1, ScalarType.Int64).to(model.Device))) bytesPerToken = probe.shape[^1] * probe.ElementSize;
        var groups = TaskMetric.Groups(encoded, bytesPerToken, GroupHiddenBytes);
        var results = new TaskResults(encoded);
        sw.Restart();
        long done = 0, padded = 0, total = encoded.Tokens;
        for (int g = 0; g < groups.Count; g++)
        {
            using var metric = new TaskMetric(encoded, groups[g], results);
            long tokens = groups[g].Sum(r => (long)encoded.Rows[r].Length);
            padded += metric.PaddedTokens;
            int gi = g;
            StreamedMetrics.Dense(model, metric, b =>
            {
                double fraction = (done + tokens * (b + 1.0) / model.BlockCount) / total;
                double elapsed = sw.Elapsed.TotalSeconds;
                log?.Invoke($"tasks: group {gi + 1}/{groups.Count}, block {b + 1}/{model.BlockCount}, {elapsed:F1}s, ETA {elapsed / Math.Max(fraction, 1e-9) - elapsed:F0}s");
            });
            done += tokens;
        }
        double forward = sw.Elapsed.TotalSeconds;
        var summary = TaskScoring.Score(encoded, results);
        foreach (var t in summary.Tasks)
            log?.Invoke($"{t.Name}: acc {t.Acc:F4}{(t.AccNorm is double n ? $", acc_norm {n:F4}" : "")} on {t.Docs} docs");
        log?.Invoke($"mean acc {summary.MeanAcc:F4}; {encoded.Requests / Math.Max(tokenize + forward, 1e-9):F1} requests/s, {encoded.Tokens / Math.Max(forward, 1e-9):F0} tokens/s");
        return new TaskRun(model.ModelDir, encoded, results, summary, model.ParameterCount(), SafeDTypes.ConfigName(model.StoredDType),
            SafeDTypes.ConfigName(model.ComputeDType), tokenize, forward, padded, groups.Count);
    }
}
