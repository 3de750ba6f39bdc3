using System.IO.Compression;
using System.Text;
using System.Text.Json;
using LlmSnp.Data;

namespace LlmSnp.Evaluation.Tasks;

/// <summary>
/// One document of a zero-shot task, as the loglikelihood requests lm-evaluation-harness builds from it:
/// (context, continuation) per choice, the gold choice, and the strings acc_norm divides by.
/// </summary>
/// <param name="Line">1-based line of the task file (for messages).</param>
/// <param name="Choices">The choice strings without the target delimiter: acc_norm divides each loglikelihood by its length.</param>
/// <param name="Group">BLiMP's paradigm (phenomenon): accuracy is reported per group and as their mean.</param>
public sealed record TaskDoc(int DocId, int Line, IReadOnlyList<(string Context, string Continuation)> Requests, IReadOnlyList<string> Choices, int Gold, string? Group);

/// <summary>The three document shapes of the bundled files (eval/data/tasks/PROVENANCE.md).</summary>
public enum TaskShape
{
    /// <summary>`context`, `choices`, `gold`: one request (context, " " + choice) per choice.</summary>
    Choices,
    /// <summary>`contexts`, `continuation`, `gold` (WinoGrande's partial scoring): (contexts[i], " " + continuation).</summary>
    Contexts,
    /// <summary>`good`, `bad` (BLiMP): ("", " " + good) against ("", " " + bad), gold 0.</summary>
    MinimalPair,
}

/// <summary>A task's documents (after --limit) and which metrics it reports.</summary>
public sealed record TaskSet(string Name, string Source, TaskShape Shape, bool HasAccNorm, IReadOnlyList<TaskDoc> Docs, int DocsInFile);

/// <summary>The bundled tasks (eval/data/tasks/*.jsonl.gz) and task files of the user's own in the same format.</summary>
public static class TaskCatalog
{
    /// <summary>lm-eval's default target delimiter between a context and a choice.</summary>
    public const string TargetDelimiter = " ";

    /// <summary>Bundled task → whether lm-eval's task reports acc_norm (the YAML's metric_list).</summary>
    public static readonly IReadOnlyDictionary<string, bool> Known = new Dictionary<string, bool>(StringComparer.Ordinal)
    {
        ["boolq"] = false, ["piqa"] = true, ["hellaswag"] = true, ["winogrande"] = false,
        ["arc_easy"] = true, ["arc_challenge"] = true, ["openbookqa"] = true, ["blimp"] = false,
    };

    /// <summary>The seven tasks structured-pruning papers report (BLiMP is the eighth, for small models).</summary>
    public static readonly IReadOnlyList<string> PaperSuite = new[] { "boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa" };

    public static string Directory => Path.Combine(RepoPaths.EvalData, "tasks");

    static string KnownList => string.Join(", ", Known.Keys);

    /// <summary>Comma-separated task names or .jsonl(.gz) paths → their task sets, each limited to the first <paramref name="limit"/> documents (per BLiMP paradigm).</summary>
    public static IReadOnlyList<TaskSet> Load(string spec, int? limit)
    {
        var items = spec.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        if (items.Length == 0) throw new LlmSnpException($"--tasks: no task given (known: {KnownList}; or a .jsonl file)");
        var sets = items.Select(i => LoadOne(i, limit)).ToList();
        var dup = sets.GroupBy(s => s.Name).FirstOrDefault(g => g.Count() > 1);
        if (dup != null) throw new LlmSnpException($"--tasks: '{dup.Key}' is given twice");
        return sets;
    }

    static bool LooksLikePath(string s) =>
        s.Contains('/') || s.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase) || s.EndsWith(".jsonl.gz", StringComparison.OrdinalIgnoreCase) || File.Exists(s);

    static TaskSet LoadOne(string item, int? limit)
    {
        if (Known.TryGetValue(item, out bool accNorm))
        {
            string path = Path.Combine(Directory, item + ".jsonl.gz");
            if (!File.Exists(path)) throw new LlmSnpException($"{path}: bundled task file not found (LLMSNP_HOME or the repository layout is wrong)");
            var (shape, docs) = ReadFile(path);
            return new TaskSet(item, $"bundled {item} ({docs.Count} docs)", shape, accNorm, Limit(docs, limit), docs.Count);
        }
        if (!LooksLikePath(item)) throw new LlmSnpException($"--tasks: unknown task '{item}' (known: {KnownList}; or a path to a .jsonl file of the same format)");
        if (!File.Exists(item)) throw new LlmSnpException($"{item}: task file not found");
        var (s, d) = ReadFile(item);
        string name = Path.GetFileName(item);
        foreach (var ext in new[] { ".gz", ".jsonl" })
            if (name.EndsWith(ext, StringComparison.OrdinalIgnoreCase)) name = name[..^ext.Length];
        // A file of the user's own reports acc_norm wherever its shape has choices to divide by.
        return new TaskSet(name, $"{item} ({d.Count} docs)", s, s == TaskShape.Choices, Limit(d, limit), d.Count);
    }

    /// <summary>The first N documents; with groups (BLiMP paradigms, each a task of its own in lm-eval) the first N of each.</summary>
    static IReadOnlyList<TaskDoc> Limit(List<TaskDoc> docs, int? limit)
    {
        if (limit is not int n) return docs;
        if (docs.All(d => d.Group is null)) return docs.Take(n).ToList();
        var taken = new Dictionary<string, int>(StringComparer.Ordinal);
        return docs.Where(d => (taken[d.Group ?? ""] = taken.GetValueOrDefault(d.Group ?? "") + 1) <= n).ToList();
    }

    static IEnumerable<string> Lines(string path)
    {
        Stream s = File.OpenRead(path);
        if (path.EndsWith(".gz", StringComparison.OrdinalIgnoreCase)) s = new GZipStream(s, CompressionMode.Decompress);
        using var reader = new StreamReader(s, Encoding.UTF8);
        while (true)
        {
            string? line;
            try { line = reader.ReadLine(); }
            catch (InvalidDataException e) { throw new LlmSnpException($"{path}: not a readable gzip file ({e.Message})"); }
            if (line is null) yield break;
            yield return line;
        }
    }

    /// <summary>Reads a task file: every line one document of the same shape as the first.</summary>
    public static (TaskShape Shape, List<TaskDoc> Docs) ReadFile(string path)
    {
        var docs = new List<TaskDoc>();
        TaskShape? shape = null;
        int lineNo = 0;
        foreach (var line in Lines(path))
        {
            lineNo++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            JsonDocument json;
            try { json = JsonDocument.Parse(line); }
            catch (JsonException e) { throw new LlmSnpException($"{path}:{lineNo}: not valid JSON ({e.Message.Split('\n')[0]})"); }
            using (json)
            {
                var root = json.RootElement;
                if (root.ValueKind != JsonValueKind.Object) throw new LlmSnpException($"{path}:{lineNo}: expected a JSON object");
                var s = ShapeOf(root) ?? throw new LlmSnpException($"{path}:{lineNo}: expected \"context\", \"choices\", \"gold\" "
                    + "or \"contexts\", \"continuation\", \"gold\" or \"good\", \"bad\" (eval/data/tasks/PROVENANCE.md)");
                shape ??= s;
                if (s != shape) throw new LlmSnpException($"{path}:{lineNo}: a {Describe(s)} document in a file of {Describe(shape.Value)} documents");
                docs.Add(Parse(root, s, path, lineNo, docs.Count));
            }
        }
        if (shape is null) throw new LlmSnpException($"{path}: no documents");
        return (shape.Value, docs);
    }

    static TaskShape? ShapeOf(JsonElement o) =>
        o.TryGetProperty("choices", out _) || o.TryGetProperty("context", out _) ? TaskShape.Choices
        : o.TryGetProperty("contexts", out _) ? TaskShape.Contexts
        : o.TryGetProperty("good", out _) || o.TryGetProperty("bad", out _) ? TaskShape.MinimalPair
        : null;

    static string Describe(TaskShape s) => s switch
    {
        TaskShape.Choices => "context/choices", TaskShape.Contexts => "contexts/continuation", _ => "good/bad",
    };

    static TaskDoc Parse(JsonElement o, TaskShape shape, string path, int line, int index)
    {
        string Where(string field) => $"{path}:{line}: \"{field}\"";
        string Str(string field)
        {
            if (!o.TryGetProperty(field, out var v) || v.ValueKind != JsonValueKind.String) throw new LlmSnpException($"{Where(field)} must be a string");
            return v.GetString()!;
        }
        List<string> Strings(string field)
        {
            if (!o.TryGetProperty(field, out var v) || v.ValueKind != JsonValueKind.Array) throw new LlmSnpException($"{Where(field)} must be an array of strings");
            var list = v.EnumerateArray().Select(e => e.ValueKind == JsonValueKind.String ? e.GetString()! : throw new LlmSnpException($"{Where(field)} must be an array of strings")).ToList();
            if (list.Count < 2) throw new LlmSnpException($"{Where(field)} needs at least two entries (has {list.Count})");
            return list;
        }
        int Gold(int count)
        {
            if (!o.TryGetProperty("gold", out var v) || v.ValueKind != JsonValueKind.Number || !v.TryGetInt32(out int g))
                throw new LlmSnpException($"{Where("gold")} must be an integer");
            if (g < 0 || g >= count) throw new LlmSnpException($"{path}:{line}: gold {g} is out of range for {count} choices (0 to {count - 1})");
            return g;
        }
        int docId = index;
        if (o.TryGetProperty("doc_id", out var id))
            docId = id.ValueKind == JsonValueKind.Number && id.TryGetInt32(out int d) ? d : throw new LlmSnpException($"{Where("doc_id")} must be an integer");
        switch (shape)
        {
            case TaskShape.Choices:
                {
                    string context = Str("context");
                    var choices = Strings("choices");
                    return new TaskDoc(docId, line, choices.Select(c => (context, TargetDelimiter + c)).ToList(), choices, Gold(choices.Count), null);
                }
            case TaskShape.Contexts:
                {
                    var contexts = Strings("contexts");
                    string continuation = Str("continuation");
                    return new TaskDoc(docId, line, contexts.Select(c => (c, TargetDelimiter + continuation)).ToList(), contexts, Gold(contexts.Count), null);
                }
            default:
                {
                    string good = Str("good"), bad = Str("bad");
                    string? group = o.TryGetProperty("phenomenon", out var p)
                        ? p.ValueKind == JsonValueKind.String ? p.GetString() : throw new LlmSnpException($"{Where("phenomenon")} must be a string")
                        : null;
                    // BLiMP in lm-eval: an empty context, the target delimiter before each sentence, gold = the good one.
                    return new TaskDoc(docId, line, new[] { ("", TargetDelimiter + good), ("", TargetDelimiter + bad) }, new[] { good, bad }, 0, group);
                }
        }
    }
}
