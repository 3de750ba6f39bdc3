namespace LlmSnp.Data.Images;

/// <summary>One labelled image: its full path, class index and optional synset id (e.g. n01440764).</summary>
public sealed record LabelledImage(string Path, int Label, string? Synset)
{
    /// <summary>Where the label came from, "labels.tsv:LINE", for errors found later (a class the model lacks).</summary>
    public string? Source { get; init; }

    // Where a label was read is provenance, not part of what the image is.
    public bool Equals(LabelledImage? o) => o is not null && Path == o.Path && Label == o.Label && Synset == o.Synset;
    public override int GetHashCode() => HashCode.Combine(Path, Label, Synset);
}

/// <summary>
/// A folder of labelled images: <c>labels.tsv</c> holds one "file TAB class index [TAB synset]" per line,
/// no header; each file lies in the folder itself or in its <c>images/</c> subfolder. Blank lines are skipped.
/// </summary>
public sealed class ImageSet
{
    public const string LabelsFile = "labels.tsv";

    public string Directory { get; }
    public IReadOnlyList<LabelledImage> Images { get; }

    ImageSet(string dir, IReadOnlyList<LabelledImage> images) { Directory = dir; Images = images; }

    /// <summary>Reads labels.tsv; with <paramref name="classes"/>, a class index outside the model's classes is an error, not a miss.</summary>
    public static ImageSet Load(string dir, long? classes = null)
    {
        string labels = Path.Combine(dir, LabelsFile);
        if (!File.Exists(labels)) throw new LlmSnpException($"{labels}: not found (an image set needs labels.tsv: file TAB class index [TAB synset])");
        string imagesDir = Path.Combine(dir, "images");
        string[] lines;
        try { lines = File.ReadAllLines(labels); }
        catch (IOException e) { throw new LlmSnpException($"{labels}: cannot read ({e.Message})", e); }

        var list = new List<LabelledImage>(lines.Length);
        for (int i = 0; i < lines.Length; i++)
        {
            string line = lines[i].TrimEnd('\r');
            if (line.Trim().Length == 0) continue;
            string where = $"{labels}:{i + 1}";
            string[] f = line.Split('\t');
            if (f.Length is < 2 or > 3)
                throw new LlmSnpException($"{where}: expected \"file TAB class index [TAB synset]\", got {f.Length} tab-separated field(s)");
            string file = f[0].Trim();
            if (file.Length == 0) throw new LlmSnpException($"{where}: empty file name");
            if (Path.IsPathRooted(file) || file.Split('/', '\\').Contains(".."))
                throw new LlmSnpException($"{where}: file name \"{file}\" must be relative to the folder");
            if (!int.TryParse(f[1].Trim(), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int label))
                throw new LlmSnpException($"{where}: class index \"{f[1]}\" is not a non-negative integer");
            if (classes is long n && label >= n) throw new LlmSnpException(ClassError(where, label, n));
            string? synset = f.Length == 3 && f[2].Trim().Length > 0 ? f[2].Trim() : null;
            string path = Path.Combine(dir, file);
            if (!File.Exists(path))
            {
                path = Path.Combine(imagesDir, file);
                if (!File.Exists(path)) throw new LlmSnpException($"{where}: image \"{file}\" not found in {dir} or {imagesDir}");
            }
            list.Add(new LabelledImage(path, label, synset) { Source = where });
        }
        if (list.Count == 0) throw new LlmSnpException($"{labels}: no images listed");
        return new ImageSet(dir, list);
    }

    public static string ClassError(string where, long label, long classes) =>
        $"{where}: class index {label} is outside the model's {classes} classes (0..{classes - 1})";
}
