using static TorchSharp.torch;

namespace LlmSnp.Data;

/// <summary>One calibration window: which document it came from and where it starts (in tokens).</summary>
public sealed record CalibrationWindow(int Document, int Offset);

/// <summary>
/// Calibration windows (models.md, calibration protocol): N windows of L tokens, each from a
/// seeded-random document longer than L at a seeded-random offset.
/// </summary>
public sealed class CalibrationSet
{
    public required string Source { get; init; }
    public required int SeqLen { get; init; }
    public required int Seed { get; init; }
    public required IReadOnlyList<CalibrationWindow> Windows { get; init; }
    /// <summary>Token ids [N, L].</summary>
    public required Tensor Ids { get; init; }

    public static CalibrationSet Sample(ITextTokenizer tok, string source, int samples, int seqLen, int seed)
    {
        if (samples < 1) throw new LlmSnpException($"--calib-samples must be at least 1 (got {samples})");
        if (seqLen < 2) throw new LlmSnpException($"--calib-seqlen must be at least 2 (got {seqLen})");
        var docs = TextSources.Documents(source);
        var encoded = docs.Select(tok.Encode).ToList();
        var eligible = Enumerable.Range(0, encoded.Count).Where(i => encoded[i].Length > seqLen).ToList();
        if (eligible.Count == 0)
            throw new LlmSnpException($"{TextSources.Describe(source)}: no document is longer than {seqLen} tokens; use a smaller --calib-seqlen");
        var rng = new Random(seed);
        var windows = new List<CalibrationWindow>();
        var ids = new long[samples * (long)seqLen];
        for (int s = 0; s < samples; s++)
        {
            int doc = eligible[rng.Next(eligible.Count)];
            int offset = rng.Next(encoded[doc].Length - seqLen);
            windows.Add(new CalibrationWindow(doc, offset));
            for (int j = 0; j < seqLen; j++) ids[s * (long)seqLen + j] = encoded[doc][offset + j];
        }
        return new CalibrationSet
        {
            Source = source, SeqLen = seqLen, Seed = seed, Windows = windows,
            Ids = torch.tensor(ids, new long[] { samples, seqLen }),
        };
    }
}
