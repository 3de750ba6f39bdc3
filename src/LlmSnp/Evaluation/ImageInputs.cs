using LlmSnp.Data.Images;
using static TorchSharp.torch;

namespace LlmSnp.Evaluation;

/// <summary>Preprocessed, labelled images ready for a ViT: pixels [N, 3, H, W] and labels.</summary>
public sealed class ImageBatch : IDisposable
{
    public required Tensor Pixels { get; init; }
    public required long[] Labels { get; init; }
    public required IReadOnlyList<string> Files { get; init; }
    /// <summary>Per image, the labels.tsv line its label came from (null where unknown).</summary>
    public IReadOnlyList<string?>? Sources { get; init; }
    public int Skipped { get; init; }
    public void Dispose() => Pixels.Dispose();
}

public static class ImageInputs
{
    /// <summary>
    /// Decodes and preprocesses the images (in parallel); unreadable ones are named through
    /// <paramref name="log"/>, skipped and counted.
    /// </summary>
    public static ImageBatch Load(IReadOnlyList<LabelledImage> images, PreprocessConfig cfg, Action<string>? log)
    {
        var chw = new float[]?[images.Count];
        var errors = new string?[images.Count];
        Parallel.For(0, images.Count, new ParallelOptions { MaxDegreeOfParallelism = Environment.ProcessorCount }, i =>
        {
            try { chw[i] = ImagePreprocessor.ToChw(ImageDecoder.Decode(images[i].Path), cfg); }
            catch (LlmSnpException e) { errors[i] = e.Message; }
        });
        var ok = Enumerable.Range(0, images.Count).Where(i => chw[i] != null).ToList();
        foreach (var e in errors.Where(e => e != null)) log?.Invoke($"skipped: {e}");
        if (ok.Count == 0) throw new LlmSnpException("no readable images");
        return new ImageBatch
        {
            Pixels = ImagePreprocessor.Batch(ok.Select(i => chw[i]!).ToList(), cfg.CropHeight, cfg.CropWidth),
            Labels = ok.Select(i => (long)images[i].Label).ToArray(),
            Files = ok.Select(i => images[i].Path).ToList(),
            Sources = ok.Select(i => images[i].Source).ToList(),
            Skipped = images.Count - ok.Count,
        };
    }

    /// <summary>A seeded choice of <paramref name="count"/> images (without replacement) and the rest.</summary>
    public static (List<LabelledImage> Chosen, List<LabelledImage> Others) Split(IReadOnlyList<LabelledImage> all, int count, int seed)
    {
        if (count < 1 || count >= all.Count) throw new LlmSnpException($"--calib-samples must be between 1 and {all.Count - 1} images (got {count})");
        var idx = Enumerable.Range(0, all.Count).ToArray();
        new Random(seed).Shuffle(idx);
        var chosen = idx.Take(count).OrderBy(i => i).Select(i => all[i]).ToList();
        var rest = idx.Skip(count).OrderBy(i => i).Select(i => all[i]).ToList();
        return (chosen, rest);
    }

    /// <summary>Micro-batches of pixels for the engine.</summary>
    public static List<Tensor> MicroBatches(Tensor pixels, int batch) =>
        Enumerable.Range(0, (int)((pixels.shape[0] + batch - 1) / batch))
            .Select(i => pixels.narrow(0, (long)i * batch, Math.Min(batch, pixels.shape[0] - (long)i * batch))).ToList();
}
