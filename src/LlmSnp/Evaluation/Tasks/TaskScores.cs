using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LlmSnp.Evaluation.Tasks;

/// <summary>Accuracy of one BLiMP paradigm (or any group of a task's documents).</summary>
public sealed record GroupScore(string Name, double Acc, double? AccStderr, int Docs);

/// <summary>
/// One task's metrics as lm-eval reports them: acc, acc_norm where the task has it, their standard errors
/// (sample standard deviation / √n), the documents scored; BLiMP: per paradigm, acc the unweighted mean over paradigms.
/// </summary>
public sealed record TaskScore(string Name, string Source, int Docs, int Requests, double Acc, double? AccStderr, double? AccNorm, double? AccNormStderr,
    IReadOnlyList<GroupScore>? Groups)
{
    public JsonObject ToJson()
    {
        var j = new JsonObject
        {
            ["acc"] = Acc, ["acc_stderr"] = AccStderr,
        };
        if (AccNorm is double n) { j["acc_norm"] = n; j["acc_norm_stderr"] = AccNormStderr; }
        j["docs"] = Docs;
        j["requests"] = Requests;
        j["source"] = Source;
        if (Groups != null)
            j["groups"] = new JsonObject(Groups.Select(g => KeyValuePair.Create(g.Name, (JsonNode?)new JsonObject
            {
                ["acc"] = g.Acc, ["acc_stderr"] = g.AccStderr, ["docs"] = g.Docs,
            })));
        return j;
    }
}

/// <summary>All tasks' scores and their means: acc over the tasks, and acc_norm where a task has it (acc where not), as the peers' tables mix them.</summary>
public sealed record TaskSummary(IReadOnlyList<TaskScore> Tasks)
{
    public double MeanAcc => Tasks.Average(t => t.Acc);
    public double MeanAccNorm => Tasks.Average(t => t.AccNorm ?? t.Acc);

    public JsonObject TasksJson() => new(Tasks.Select(t => KeyValuePair.Create(t.Name, (JsonNode?)t.ToJson())));

    public JsonObject MeanJson() => new()
    {
        ["acc"] = MeanAcc, ["acc_norm_or_acc"] = MeanAccNorm, ["tasks"] = Tasks.Count,
    };
}

/// <summary>Scores documents from their requests' loglikelihoods (lm-eval's `process_results` for multiple choice).</summary>
public static class TaskScoring
{
    /// <summary>Index of the first maximum (numpy's argmax).</summary>
    public static int ArgMax(IReadOnlyList<double> x)
    {
        int best = 0;
        for (int i = 1; i < x.Count; i++) if (x[i] > x[best]) best = i;
        return best;
    }

    /// <summary>Length in characters as Python counts them (code points, not UTF-16 units): acc_norm's divisor.</summary>
    public static int Characters(string s) => s.EnumerateRunes().Count();

    /// <summary>(acc, acc_norm) of one document.</summary>
    public static (bool Acc, bool AccNorm) Doc(TaskDoc doc, IReadOnlyList<double> lls)
    {
        bool acc = ArgMax(lls) == doc.Gold;
        var norm = lls.Select((ll, i) => ll / Characters(doc.Choices[i])).ToArray();
        return (acc, ArgMax(norm) == doc.Gold);
    }

    /// <summary>Sample standard deviation over √n (lm-eval's mean_stderr); null for fewer than two values.</summary>
    public static double? MeanStderr(IReadOnlyList<double> x)
    {
        int n = x.Count;
        if (n < 2) return null;
        double mean = x.Average();
        double var = x.Sum(v => (v - mean) * (v - mean)) / (n - 1);
        return Math.Sqrt(var / n);
    }

    /// <summary>lm-eval's pooled_sample_stderr: a group's stderr from its subtasks' stderrs and sizes.</summary>
    public static double? PooledStderr(IReadOnlyList<(double? Stderr, int Size)> parts)
    {
        int total = parts.Sum(p => p.Size);
        if (total - parts.Count <= 0) return null;
        double pooledVar = parts.Sum(p => (p.Size - 1) * Math.Pow(p.Stderr ?? 0, 2) * p.Size) / (total - parts.Count);
        return Math.Sqrt(pooledVar / total);
    }

    /// <summary>Every task's score over the given rows (all rows by default).</summary>
    public static TaskSummary Score(EncodedTasks tasks, TaskResults results, IEnumerable<int>? rows = null)
    {
        var byTask = (rows ?? Enumerable.Range(0, tasks.Rows.Count)).GroupBy(r => tasks.Rows[r].Task).ToDictionary(g => g.Key, g => g.ToList());
        var scores = new List<TaskScore>();
        for (int t = 0; t < tasks.Tasks.Count; t++)
        {
            if (!byTask.TryGetValue(t, out var rs)) continue;
            var task = tasks.Tasks[t];
            var docs = rs.Select(r => (Doc: task.Docs[tasks.Rows[r].Doc], Score: Doc(task.Docs[tasks.Rows[r].Doc], results.LogLikelihood[r]))).ToList();
            var acc = docs.Select(d => d.Score.Acc ? 1.0 : 0.0).ToList();
            var norm = docs.Select(d => d.Score.AccNorm ? 1.0 : 0.0).ToList();
            int requests = rs.Sum(r => tasks.Rows[r].Scored.Length);
            if (docs.Any(d => d.Doc.Group != null))
            {
                // BLiMP: each paradigm is a task of its own in lm-eval; the group's acc is their unweighted mean.
                var groups = docs.Select((d, i) => (d.Doc.Group ?? "", Acc: acc[i])).GroupBy(x => x.Item1)
                    .Select(g => new GroupScore(g.Key, g.Average(x => x.Acc), MeanStderr(g.Select(x => x.Acc).ToList()), g.Count())).ToList();
                scores.Add(new TaskScore(task.Name, task.Source, docs.Count, requests, groups.Average(g => g.Acc),
                    PooledStderr(groups.Select(g => (g.AccStderr, g.Docs)).ToList()), null, null, groups));
            }
            else
                scores.Add(new TaskScore(task.Name, task.Source, docs.Count, requests, acc.Average(), MeanStderr(acc),
                    task.HasAccNorm ? norm.Average() : null, task.HasAccNorm ? MeanStderr(norm) : null, null));
        }
        return new TaskSummary(scores);
    }

    /// <summary>`--log-samples`: one JSON line per document, what lm-eval's --log_samples needs to compare item by item.</summary>
    public static string LogSamples(EncodedTasks tasks, TaskResults results)
    {
        var sb = new StringBuilder();
        for (int r = 0; r < tasks.Rows.Count; r++)
        {
            var row = tasks.Rows[r];
            var task = tasks.Tasks[row.Task];
            var doc = task.Docs[row.Doc];
            var (acc, norm) = Doc(doc, results.LogLikelihood[r]);
            var j = new JsonObject
            {
                ["task"] = task.Name, ["doc_id"] = doc.DocId, ["gold"] = doc.Gold,
                ["loglikelihoods"] = new JsonArray(results.LogLikelihood[r].Select(x => (JsonNode)x).ToArray()),
                ["is_greedy"] = new JsonArray(results.Greedy[r].Select(x => (JsonNode)x).ToArray()),
                ["continuation_tokens"] = new JsonArray(row.Scored.Select(s => (JsonNode)new JsonArray(s.Targets.Select(x => (JsonNode)x).ToArray())).ToArray()),
                ["acc"] = acc ? 1 : 0,
            };
            if (task.HasAccNorm) j["acc_norm"] = norm ? 1 : 0;
            if (doc.Group != null) j["group"] = doc.Group;
            sb.Append(j.ToJsonString(new JsonSerializerOptions { WriteIndented = false })).Append('\n');
        }
        return sb.ToString();
    }
}
