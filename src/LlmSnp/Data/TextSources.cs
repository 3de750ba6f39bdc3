using System.Text;
using System.Text.Json;

namespace LlmSnp.Data;

/// <summary>
/// Text for perplexity and calibration. Names: `wikitext2` (the bundled WikiText-2 raw test rows),
/// `c4` (the bundled C4 sample: 1000 documents of C4 train shard 0, a stand-in for the validation
/// shard), or a path: `.json` = array of rows, `.jsonl` = {"text": …} documents, else plain text.
/// </summary>
public static class TextSources
{
    public const string WikiText2 = "wikitext2";
    public const string C4 = "c4";
    /// <summary>TinyStories validation text in two disjoint parts: `eval.txt` is evaluated, `calib.txt` calibrates.</summary>
    public const string TinyStories = "tinystories";

    public static string WikiText2Path => Path.Combine(RepoPaths.EvalData, "wikitext2-test.json");
    public static string C4Path => Path.Combine(RepoPaths.EvalData, "c4-train-first1000.jsonl");
    public static string TinyStoriesEvalPath => Path.Combine(RepoPaths.EvalData, "tinystories", "eval.txt");
    public static string TinyStoriesCalibPath => Path.Combine(RepoPaths.EvalData, "tinystories", "calib.txt");

    /// <summary>The files a source name reads: a bundled set's files, or the path itself.</summary>
    public static IReadOnlyList<string> Files(string source) => source switch
    {
        WikiText2 => new[] { WikiText2Path }, C4 => new[] { C4Path }, TinyStories => new[] { TinyStoriesEvalPath, TinyStoriesCalibPath },
        _ => new[] { source },
    };

    /// <summary>Whether calibrating on one source and evaluating on the other would measure on calibration text.</summary>
    public static bool Overlap(string calib, string eval) => calib == eval && calib != TinyStories;

    /// <summary>A readable name for reports.</summary>
    public static string Describe(string source) => source switch
    {
        WikiText2 => "WikiText-2 raw test",
        C4 => "C4 sample (train shard 0, first 1000 docs; stand-in for C4 validation)",
        TinyStories => "TinyStories validation (eval.txt to evaluate, calib.txt to calibrate)",
        _ => Path.GetFileName(source),
    };

    /// <summary>A name short enough for a plot's axis label.</summary>
    public static string ShortName(string source) => source switch
    {
        WikiText2 => "WikiText-2", C4 => "C4 sample", TinyStories => "TinyStories", _ => Path.GetFileName(source),
    };

    /// <summary>The evaluation text as the published protocol joins it: rows with "\n\n", documents with " ".</summary>
    public static string EvaluationText(string source)
    {
        var (docs, joiner) = Load(source == TinyStories ? TinyStoriesEvalPath : source);
        return string.Join(joiner, docs);
    }

    /// <summary>The documents (or rows) of a source, for calibration sampling.</summary>
    public static IReadOnlyList<string> Documents(string source) => Load(source == TinyStories ? TinyStoriesCalibPath : source).Docs;

    static (List<string> Docs, string Joiner) Load(string source)
    {
        string path = source switch { WikiText2 => WikiText2Path, C4 => C4Path, _ => source };
        if (!File.Exists(path)) throw new LlmSnpException($"{path}: dataset file not found");
        if (path.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase)) return (ReadJsonl(path), " ");
        if (path.EndsWith(".json", StringComparison.OrdinalIgnoreCase)) return (ReadRows(path), "\n\n");
        return (new List<string> { ReadText(path) }, "");
    }

    /// <summary>
    /// A text file's contents, refused with one line naming the file when it is not UTF-8 text: a compressed archive,
    /// a binary (NUL bytes, or control characters in more than 1 of 1000 characters) or a legacy 8-bit encoding such
    /// as latin-1 would otherwise tokenize to byte soup and be measured as a perplexity of billions.
    /// </summary>
    public static string ReadText(string path)
    {
        byte[] bytes;
        try { bytes = File.ReadAllBytes(path); }
        catch (FileNotFoundException) { throw new LlmSnpException($"{path}: file not found"); }
        CheckText(path, bytes);
        int bom = bytes.AsSpan().StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF]) ? 3 : 0;
        return Encoding.UTF8.GetString(bytes, bom, bytes.Length - bom);
    }

    static readonly (byte[] Magic, string Format, string Tool)[] Compressed =
    {
        ([0x1F, 0x8B], "gzip", "gunzip"), ([0x28, 0xB5, 0x2F, 0xFD], "zstd", "unzstd"), ([0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00], "xz", "unxz"),
        ([0x42, 0x5A, 0x68], "bzip2", "bunzip2"), ([0x50, 0x4B, 0x03, 0x04], "zip", "unzip"),
    };

    /// <summary>Throws unless <paramref name="bytes"/> are UTF-8 text (see <see cref="ReadText"/>).</summary>
    public static void CheckText(string path, ReadOnlySpan<byte> bytes)
    {
        foreach (var (magic, format, tool) in Compressed)
            if (bytes.StartsWith(magic)) throw new LlmSnpException($"{path}: is {format}-compressed, not text; decompress it first ({tool})");
        int nul = bytes.IndexOf((byte)0);
        if (nul >= 0) throw new LlmSnpException($"{path}: holds a NUL byte at offset {nul}: a binary file, not text");
        if (!System.Text.Unicode.Utf8.IsValid(bytes))
        {
            var buffer = new char[1 << 16];
            for (int at = 0; at < bytes.Length;)
            {
                var status = System.Text.Unicode.Utf8.ToUtf16(bytes[at..], buffer, out int read, out _, replaceInvalidSequences: false, isFinalBlock: true);
                if (status == System.Buffers.OperationStatus.InvalidData)
                    throw new LlmSnpException($"{path}: not UTF-8 text (byte 0x{bytes[at + read]:X2} at offset {at + read} starts no UTF-8 character); a latin-1 or other 8-bit file must be converted first (iconv -f latin1 -t utf-8)");
                if (read == 0) break;
                at += read;
            }
        }
        long controls = 0;
        foreach (byte b in bytes) if (b < 0x20 && b is not ((byte)'\n' or (byte)'\r' or (byte)'\t' or 0x0B or 0x0C or 0x1B)) controls++;
        if (controls * 1000 > bytes.Length)
            throw new LlmSnpException($"{path}: {controls} control characters in {bytes.Length} bytes: a binary file, not text");
    }

    public static List<string> ReadRows(string path)
    {
        try
        {
            byte[] bytes = File.ReadAllBytes(path);
            CheckText(path, bytes);
            using var doc = JsonDocument.Parse(bytes);
            if (doc.RootElement.ValueKind != JsonValueKind.Array) throw new LlmSnpException($"{path}: expected a JSON array of strings");
            return doc.RootElement.EnumerateArray().Select((e, i) => e.ValueKind == JsonValueKind.String
                ? e.GetString()! : throw new LlmSnpException($"{path}: row {i} is not a string")).ToList();
        }
        catch (JsonException e) { throw new LlmSnpException($"{path}: not valid JSON ({e.Message.Split('\n')[0]})"); }
    }

    public static List<string> ReadJsonl(string path)
    {
        var docs = new List<string>();
        int lineNo = 0;
        foreach (var line in ReadText(path).Split('\n'))
        {
            lineNo++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                using var doc = JsonDocument.Parse(line);
                if (doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty("text", out var t) || t.ValueKind != JsonValueKind.String)
                    throw new LlmSnpException($"{path}:{lineNo}: expected an object with a \"text\" string");
                docs.Add(t.GetString()!);
            }
            catch (JsonException e) { throw new LlmSnpException($"{path}:{lineNo}: not valid JSON ({e.Message.Split('\n')[0]})"); }
        }
        return docs;
    }
}
