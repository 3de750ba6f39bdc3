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
        return (new List<string> { File.ReadAllText(path, Encoding.UTF8) }, "");
    }

    public static List<string> ReadRows(string path)
    {
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
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
        foreach (var line in File.ReadLines(path, Encoding.UTF8))
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
