using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Evaluation;

/// <summary>A perplexity measurement of one checkpoint (`eval ppl`, and dense/pruned in `prune`).</summary>
public sealed record PerplexityReport(string Model, string Dataset, double Perplexity, int Windows, long Tokens, int SeqLen, double FirstWindowNll,
    long Parameters, string DType, string ComputeDType, double Seconds, double TokensPerSecond)
{
    public JsonObject ToJson() => new()
    {
        ["model"] = Model, ["dataset"] = Dataset, ["perplexity"] = Perplexity, ["windows"] = Windows, ["tokens"] = Tokens, ["seqlen"] = SeqLen,
        ["first_window_nll"] = FirstWindowNll, ["parameters"] = Parameters, ["dtype"] = DType, ["compute_dtype"] = ComputeDType,
        ["seconds"] = Seconds, ["tokens_per_second"] = TokensPerSecond,
    };
}

/// <summary>`llmsnp eval ppl`: tokenize a dataset and measure a checkpoint's perplexity.</summary>
public static class PerplexityJob
{
    public static PerplexityReport Run(string modelDir, string dataset, int? seqLen, int? maxWindows, Device device, ScalarType dtype, Action<string>? log)
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

    public static PerplexityReport Measure(ILanguageModel model, int[] ids, string dataset, int? seqLen, int? maxWindows, Action<string>? log)
    {
        int len = seqLen ?? Math.Min(2048, model.MaxPositions);
        var r = Perplexity.Evaluate(model, ids, len, maxWindows, dataset, log);
        return new PerplexityReport(model.ModelDir, TextSources.Describe(dataset), r.Perplexity, r.Windows, r.Tokens, r.SeqLen, r.FirstWindowNll,
            model.ParameterCount(), Checkpoint.SafeDTypes.ConfigName(model.StoredDType), Checkpoint.SafeDTypes.ConfigName(model.ComputeDType),
            r.Seconds, r.TokensPerSecond);
    }
}
