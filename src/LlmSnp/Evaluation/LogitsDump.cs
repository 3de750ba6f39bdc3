using System.Text.Json.Nodes;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Evaluation;

/// <summary>
/// `llmsnp eval logits`: LlmSnp's logits for one fixed input, in float64, so that another runtime
/// (tools/reference/stock_load_check.py with stock transformers) can be compared against them. Image models get a
/// deterministic pattern instead of a decoded image, so that neither side's image pipeline enters the comparison.
/// </summary>
public static class LogitsDump
{
    /// <summary>The pattern image, already normalised: pixel (c, h, w) = sin(0.05·w + 0.07·h + 1.3·c) (the golden test's input).</summary>
    public static Tensor Pattern(int channels, int size)
    {
        using var scope = NewDisposeScope();
        var c = torch.arange(channels, dtype: ScalarType.Float64).reshape(channels, 1, 1);
        var h = torch.arange(size, dtype: ScalarType.Float64).reshape(1, size, 1);
        var w = torch.arange(size, dtype: ScalarType.Float64).reshape(1, 1, size);
        return torch.sin(0.05 * w + 0.07 * h + 1.3 * c).unsqueeze(0).to(ScalarType.Float32).MoveToOuterDisposeScope();
    }

    public static JsonObject Run(string modelDir, IReadOnlyList<long>? ids, Device device, ScalarType dtype)
    {
        var family = ModelFamilies.Of(modelDir);
        using var model = ModelFamilies.Open(modelDir, device, dtype);
        using var scope = NewDisposeScope();
        Tensor input;
        if (family.Modality == Modality.Text)
        {
            if (ids is null || ids.Count == 0) throw new LlmSnpException("eval logits: a language model needs --ids (comma-separated token ids)");
            input = torch.tensor(ids.ToArray(), new long[] { 1, ids.Count });
        }
        else
        {
            if (ids is not null) throw new LlmSnpException("eval logits: an image classifier takes no --ids (its input is the fixed pattern image)");
            var classifier = (IImageClassifier)model;
            input = Pattern(classifier.Channels, classifier.ImageSize);
        }
        var h = model.Embed(input);
        for (int i = 0; i < model.BlockCount; i++)
            using (var b = model.LoadBlock(i)) h = b.Forward(h)!;
        var logits = model.Head(h).squeeze(0).to(ScalarType.Float64).cpu();
        JsonNode Row(Tensor r) => new JsonArray(r.data<double>().Select(x => (JsonNode)x).ToArray());
        return new JsonObject
        {
            ["model"] = modelDir, ["family"] = family.Name, ["compute_dtype"] = Checkpoint.SafeDTypes.ConfigName(dtype),
            ["input"] = family.Modality == Modality.Text ? new JsonArray(ids!.Select(x => (JsonNode)x).ToArray()) : "pattern: sin(0.05 w + 0.07 h + 1.3 c), normalised",
            ["parameters"] = model.ParameterCount(),
            ["logits"] = logits.dim() == 1 ? Row(logits) : new JsonArray(Enumerable.Range(0, (int)logits.shape[0]).Select(t => Row(logits[t])).ToArray()),
        };
    }
}
