using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Evaluation;

/// <summary>`llmsnp eval ppl`: tokenize a dataset and measure a checkpoint's perplexity.</summary>
public static class PerplexityJob
{
    public static JsonObject Run(string modelDir, string dataset, int? seqLen, int? maxWindows, Device device, ScalarType dtype, Action<string>? log)
    {
        using var model = ModelFamilies.OpenLanguageModel(modelDir, device, dtype, "eval ppl");
        var ids = Tokenize(model, dataset, log);
        return Measure(model, ids, dataset, seqLen, maxWindows, log);
    }

    public static int[] Tokenize(ILanguageModel model, string dataset, Action<string>? log)
    {
        var tok = model.Tokenizer();
        var ids = tok.Encode(TextSources.EvaluationText(dataset));
        log?.Invoke($"{TextSources.Describe(dataset)}: {ids.Length} tokens");
        return ids;
    }

    public static JsonObject Measure(ILanguageModel model, int[] ids, string dataset, int? seqLen, int? maxWindows, Action<string>? log)
    {
        int len = seqLen ?? Math.Min(2048, model.MaxPositions);
        var r = Perplexity.Evaluate(model, ids, len, maxWindows, dataset, log);
        return new JsonObject
        {
            ["model"] = model.ModelDir,
            ["dataset"] = TextSources.Describe(dataset),
            ["perplexity"] = r.Perplexity,
            ["windows"] = r.Windows,
            ["tokens"] = r.Tokens,
            ["seqlen"] = r.SeqLen,
            ["first_window_nll"] = r.FirstWindowNll,
            ["parameters"] = model.ParameterCount(),
            ["dtype"] = Checkpoint.SafeDTypes.ConfigName(model.StoredDType),
            ["compute_dtype"] = Checkpoint.SafeDTypes.ConfigName(model.ComputeDType),
            ["seconds"] = r.Seconds,
            ["tokens_per_second"] = r.TokensPerSecond,
        };
    }
}
