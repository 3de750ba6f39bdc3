using System.Diagnostics;
using System.Text.Json.Nodes;
using LlmSnp.Data.Images;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Evaluation;

/// <summary>What `eval accuracy` measured.</summary>
public sealed record AccuracyResult(string Model, string ImagesDir, double Top1, double Top5, int Images, int Skipped, long Parameters,
    string DType, double PreprocessSeconds, double Seconds)
{
    public JsonObject ToJson() => new()
    {
        ["model"] = Model, ["images_dir"] = ImagesDir, ["top1"] = Top1, ["top5"] = Top5, ["images"] = Images, ["skipped"] = Skipped,
        ["parameters"] = Parameters, ["dtype"] = DType, ["preprocess_seconds"] = PreprocessSeconds, ["seconds"] = Seconds,
    };
}

/// <summary>`llmsnp eval accuracy`: top-1 / top-5 of an image classifier on a labelled image folder.</summary>
public static class AccuracyJob
{
    public static AccuracyResult Run(string modelDir, string imagesDir, int? limit, int batch, Device device, ScalarType dtype, Action<string>? log)
    {
        using var model = ModelFamilies.OpenImageClassifier(modelDir, device, dtype, "eval accuracy");
        var set = ImageSet.Load(imagesDir, model.Classes).Images;
        var chosen = limit is int l ? set.Take(l).ToList() : set.ToList();
        var sw = Stopwatch.StartNew();
        using var images = ImageInputs.Load(chosen, PreprocessConfig.Load(modelDir), log);
        double prep = sw.Elapsed.TotalSeconds;
        var r = Measure(model, images, batch);
        log?.Invoke($"top-1 {r.Top1:F2} %, top-5 {r.Top5:F2} % on {images.Labels.Length} images");
        return new AccuracyResult(modelDir, imagesDir, r.Top1, r.Top5, images.Labels.Length, images.Skipped, model.ParameterCount(),
            Checkpoint.SafeDTypes.ConfigName(model.StoredDType), prep, sw.Elapsed.TotalSeconds);
    }

    /// <summary>Top-1 and top-5 (%), blocks streamed once over all images.</summary>
    public static (double Top1, double Top5) Measure(IImageClassifier model, ImageBatch images, int batch)
    {
        // A label the classifier cannot output would only ever count as a miss: refuse it, naming its line.
        long classes = model.Classes;
        for (int i = 0; i < images.Labels.Length; i++)
            if (images.Labels[i] >= classes)
                throw new LlmSnpException(ImageSet.ClassError(images.Sources?[i] ?? images.Files[i], images.Labels[i], classes));
        var metric = new AccuracyMetric(images.Pixels, images.Labels, batch);
        double top1 = StreamedMetrics.Dense(model, metric);
        return (top1, metric.LastTop5);
    }
}
