using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LlmSnp.Checkpoint;
using LlmSnp.Evaluation;
using LlmSnp.Models;

namespace LlmSnp.Pruning;

/// <summary>
/// The model card of a pruned checkpoint (OUT/README.md): the hub's YAML front matter, what was pruned and how,
/// the measurements of the run that wrote it, and how to load it. Generated from the run's report
/// (pruning_config.json), the source's own card and config, never edited by hand.
/// </summary>
public static class ModelCard
{
    public const string FileName = "README.md";

    /// <summary>Writes DIR/README.md for the pruned checkpoint in DIR (atomically; replaces an earlier card).</summary>
    /// <param name="outDir">the output as the user named it, for the load commands the card shows</param>
    public static void Write(string dir, JsonObject report, string sourceDir, string outDir, MetricPair? eval = null, SpeedUp? speed = null)
    {
        var family = ModelFamilies.Of(sourceDir);
        var source = SourceMetadata.Read(sourceDir);
        bool padded = Directory.Exists(Path.Combine(dir, PrunedCheckpoint.PaddedDir));
        AtomicFile.WriteAllText(Path.Combine(dir, FileName), Render(report, source, family.Modality, family.Gguf is not null, padded, outDir, eval, speed));
    }

    /// <summary>The card's text: front matter, then Markdown.</summary>
    public static string Render(JsonObject report, SourceMetadata source, Modality modality, bool exportsGguf, bool hasPadded,
        string outDir, MetricPair? eval, SpeedUp? speed)
    {
        bool stock = report["stock_loadable"]?.GetValue<bool>() == true;
        string baseModel = source.BaseModel ?? (string)report["source_model"]!;
        string outPath = outDir.Replace('\\', '/').TrimEnd('/');
        var sb = new StringBuilder();

        // Front matter: the keys the hub reads (https://huggingface.co/docs/hub/model-cards).
        sb.Append("---\n");
        sb.Append("base_model: ").Append(Yaml(baseModel)).Append('\n');
        if (source.License != null) sb.Append("license: ").Append(Yaml(source.License)).Append('\n');
        if (source.LicenseName != null) sb.Append("license_name: ").Append(Yaml(source.LicenseName)).Append('\n');
        if (source.LicenseLink != null) sb.Append("license_link: ").Append(Yaml(source.LicenseLink)).Append('\n');
        if (source.Languages.Count > 0)
        {
            sb.Append("language:\n");
            foreach (var l in source.Languages) sb.Append("- ").Append(Yaml(l)).Append('\n');
        }
        sb.Append("tags:\n- pruned\n- llmsnp\n");
        if (stock) sb.Append("library_name: transformers\n");
        sb.Append("pipeline_tag: ").Append(modality == Modality.Image ? "image-classification" : "text-generation").Append('\n');
        sb.Append("---\n\n");

        long before = Long(report, "params_before"), after = Long(report, "params_after");
        var o = report["options"]!.AsObject();
        string policy = (string)o["policy"]!;
        sb.Append($"# {report["source_model"]}, pruned\n\n");
        sb.Append($"`{baseModel}` with whole {UnitsText((string)o["targets"]!)} removed by structured pruning "
            + $"(LlmSnp {report["tool_version"]}, Subspace Node Pruning): **{N(before)} → {N(after)} parameters** "
            + $"({Pct(1 - (double)after / before)} fewer; {Pct(report["prunable_fraction_removed"]!.GetValue<double>())} of the prunable "
            + "ones). What remains is a smaller dense model of the same architecture: no masks, no sparse kernels.\n");
        if (source.SourceBaseModel != null && source.SourceBaseModel != baseModel)
            sb.Append($"\nThe source's own card names `{source.SourceBaseModel}` as its base model.\n");

        sb.Append("\n## How it was pruned\n\n| option | value |\n|---|---|\n");
        sb.Append($"| ordering of units | `{o["ordering"]}` |\n");
        var used = report["layers"]!.AsArray().Select(l => (string?)l!["reconstruct_used"]).Where(x => x != null).Distinct().ToList();
        sb.Append($"| reconstruction | `{o["reconstruct"]}`{(used.Count > 0 && !(used.Count == 1 && used[0] == (string)o["reconstruct"]!) ? $" (per layer: {string.Join(", ", used.Select(u => $"`{u}`"))})" : "")} |\n");
        double amount = o[policy]!.GetValue<double>();
        string widths = policy switch
        {
            "ratio" => $"`--ratio {F(amount)}`: {Pct(amount)} of the units of each layer removed",
            "budget" => $"`--budget {F(amount)}`: {Pct(amount)} of the prunable parameters removed",
            _ => $"`--variance {F(amount)}`: each layer keeps the units holding τ = {F(amount)} of its residual variance",
        };
        sb.Append($"| widths | {widths}{(o["uniform_widths"]!.GetValue<bool>() ? ", the same widths in every layer (`--uniform`)" : "")} |\n");
        sb.Append($"| targets | {o["targets"]} |\n");
        if (o["width_multiple"] is JsonNode wm && wm.GetValue<int>() > 1) sb.Append($"| MLP width multiple | {wm} |\n");
        sb.Append($"| damping | {F(o["damp"]!.GetValue<double>())} |\n");
        sb.Append($"| calibration | {CalibrationText(report["calibration"]!.AsObject())} |\n");
        sb.Append($"| weights written | {o["dtype_written"]} (computed in {o["compute_dtype"]}) |\n");
        sb.Append($"\nThe full record, with the kept indices of every layer, is `{PrunedCheckpoint.ReportFile}`.\n");

        sb.Append("\n## Widths per layer\n\n");
        sb.Append(WidthsTable(report["layers"]!.AsArray()));

        if (eval != null)
        {
            sb.Append("\n## Measured in this run\n\n| metric | dense | pruned | change |\n|---|---|---|---|\n");
            sb.Append(MetricRow(eval));
            if (speed != null)
            {
                sb.Append($"\nSpeed of the pruned model over the dense one, measured on the machine that pruned it: LlmSnp's forward "
                    + $"prefill **{speed.PrefillSpeedUp:F2}×** ({speed.Dense.LlmSnp.PromptLength} tokens), batch-1 decode **{speed.DecodeSpeedUp:F2}×**");
                if (speed.LlamaCppPrefillSpeedUp is double cp && speed.LlamaCppDecodeSpeedUp is double cd)
                    sb.Append($"; llama.cpp (GGUF) prefill **{cp:F2}×**, decode **{cd:F2}×**");
                sb.Append($"; weight-FLOP ratio {speed.FlopRatio:F2}.\n");
            }
        }

        sb.Append("\n## How to load it\n\n");
        string auto = modality == Modality.Image ? "AutoModelForImageClassification" : "AutoModelForCausalLM";
        if (stock)
            sb.Append($"Stock `transformers` builds it from `config.json` alone, at its pruned size:\n\n```python\nfrom transformers import {auto}\n"
                + $"model = {auto}.from_pretrained(\"{outPath}\")\n```\n");
        else
        {
            sb.Append($"Stock `transformers` cannot load this directory: {report["stock_loadable_why_not"]}.");
            if (hasPadded)
                sb.Append($" `{PrunedCheckpoint.PaddedDir}/` holds the same function at the original shapes (pruned rows and columns zero, "
                    + $"so no speed-up), which it loads:\n\n```python\nfrom transformers import {auto}\n"
                    + $"model = {auto}.from_pretrained(\"{outPath}/{PrunedCheckpoint.PaddedDir}\")\n```\n");
            else
                sb.Append(" `llmsnp prune --export-padded` also writes a zero-padded copy at the original shapes that it loads.\n");
        }
        sb.Append("\nLlmSnp runs it as it is: ");
        sb.Append(modality == Modality.Image
            ? $"`llmsnp eval accuracy --model {outPath} --images DIR`.\n"
            : $"`llmsnp eval ppl --model {outPath} --dataset wikitext2`, `llmsnp generate --model {outPath} --prompt \"…\"`.\n");
        if (exportsGguf)
            sb.Append($"\nFor llama.cpp (and the runtimes built on it), as GGUF: `llmsnp export gguf --model {outPath} --out {Path.GetFileName(outPath)}.gguf` "
                + "(arch `llama`, or `deci` where layer widths differ).\n");
        return sb.ToString();
    }

    static string MetricRow(MetricPair e)
    {
        var d = e.DenseDetails;
        if (e.Metric == "top1")
            return $"| top-1 % ({d["images"]} images) | {e.Dense:F2} | {e.Pruned:F2} | {e.Pruned - e.Dense:+0.00;-0.00} points |\n";
        string what = $"{e.Metric} ({d["dataset"]}, {d["windows"]} windows × {d["seqlen"]} tokens)";
        return $"| {what} | {e.Dense:F3} | {e.Pruned:F3} | {(e.Pruned / e.Dense - 1) * 100:+0.0;-0.0} % |\n";
    }

    static string WidthsTable(JsonArray layers)
    {
        // Per block index: (kind → "kept of total"), in the order the report lists them.
        var kinds = new List<string>();
        var rows = new SortedDictionary<int, Dictionary<string, string>>();
        foreach (var l in layers)
        {
            string kind = (string)l!["kind"]!;
            if (!kinds.Contains(kind)) kinds.Add(kind);
            int block = int.Parse(Regex.Match((string)l["name"]!, @"\d+").Value, CultureInfo.InvariantCulture);
            int groups = l["units"]!.GetValue<int>() / l["group_size"]!.GetValue<int>();
            (rows.TryGetValue(block, out var r) ? r : rows[block] = new())[kind] = $"{l["groups_kept"]} of {groups}";
        }
        var sb = new StringBuilder("| blocks | " + string.Join(" | ", kinds.Select(k => k == "mlp" ? "MLP neurons kept" : "attention groups kept")) + " |\n|---|");
        sb.Append(string.Concat(kinds.Select(_ => "---|"))).Append('\n');
        // Consecutive blocks with the same widths share a row.
        var list = rows.ToList();
        for (int i = 0; i < list.Count;)
        {
            int j = i;
            string Key(int k) => string.Join("|", kinds.Select(kind => list[k].Value.GetValueOrDefault(kind, "—")));
            while (j + 1 < list.Count && list[j + 1].Key == list[j].Key + 1 && Key(j + 1) == Key(i)) j++;
            string range = i == j ? $"{list[i].Key}" : $"{list[i].Key}–{list[j].Key}";
            sb.Append($"| {range} | {Key(i).Replace("|", " | ")} |\n");
            i = j + 1;
        }
        if (kinds.Contains("heads"))
            sb.Append("\nAn attention group is a head, or, with grouped-query attention, a K/V head with the query heads that share it.\n");
        return sb.ToString();
    }

    static string CalibrationText(JsonObject c)
    {
        string src = (string?)c["source"] ?? "?";
        if (c["seqlen"] is JsonNode len) return $"{c["samples"]} windows × {len} tokens of {src}, seed {c["seed"]}";
        return $"{c["samples"]} images from `{Path.GetFileName(src.TrimEnd('/', '\\'))}`, seed {c["seed"]}";
    }

    static string UnitsText(string targets) => targets switch
    {
        "mlp" => "MLP neurons",
        "heads" => "attention heads (K/V groups under grouped-query attention)",
        _ => "MLP neurons and attention heads (K/V groups under grouped-query attention)",
    };

    static long Long(JsonObject o, string k) => o[k]!.GetValue<long>();
    static string N(long n) => n.ToString("N0", CultureInfo.InvariantCulture);
    static string Pct(double f) => (f * 100).ToString("0.0", CultureInfo.InvariantCulture) + " %";
    static string F(double x) => x.ToString("G6", CultureInfo.InvariantCulture);

    /// <summary>A YAML scalar: plain where YAML reads it back as the same string, else double-quoted.</summary>
    public static string Yaml(string s)
    {
        bool plain = Regex.IsMatch(s, @"^[A-Za-z0-9_][A-Za-z0-9_./+-]*$")
            && !Regex.IsMatch(s, @"^([0-9._+-]+|true|false|yes|no|on|off|null|~)$", RegexOptions.IgnoreCase);
        if (plain) return s;
        var q = new StringBuilder("\"");
        foreach (char ch in s)
            q.Append(ch switch
            {
                '"' => "\\\"", '\\' => "\\\\", '\n' => "\\n", '\t' => "\\t",
                _ when char.IsControl(ch) => $"\\u{(int)ch:x4}",
                _ => ch.ToString(),
            });
        return q.Append('"').ToString();
    }
}

/// <summary>What the card carries over from the source: its identity, license and languages (its own card's front matter, else its config).</summary>
public sealed record SourceMetadata(string? BaseModel, string? License, string? LicenseName, string? LicenseLink, IReadOnlyList<string> Languages, string? SourceBaseModel)
{
    public static SourceMetadata Read(string sourceDir)
    {
        var card = FrontMatter.TryRead(Path.Combine(sourceDir, ModelCard.FileName));
        JsonObject? cfg = null;
        try { cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(sourceDir, "config.json"))) as JsonObject; }
        catch (Exception e) when (e is IOException or System.Text.Json.JsonException or UnauthorizedAccessException) { }
        string? Cfg(string k) => cfg?[k] is JsonValue v && v.TryGetValue<string>(out var s) && s.Trim().Length > 0 ? s.Trim() : null;
        IReadOnlyList<string> CfgList(string k) => cfg?[k] switch
        {
            JsonArray a => a.Select(x => x is JsonValue v && v.TryGetValue<string>(out var s) ? s : null).OfType<string>().ToList(),
            JsonValue v when v.TryGetValue<string>(out var s) => new[] { s },
            _ => Array.Empty<string>(),
        };
        string? One(string k) => card.TryGetValue(k, out var v) && v.Count == 1 ? v[0] : null;
        var languages = card.TryGetValue("language", out var langs) ? langs : CfgList("language");
        return new SourceMetadata(Identity(sourceDir, Cfg("_name_or_path")), One("license") ?? Cfg("license"), One("license_name"), One("license_link"),
            languages, One("base_model"));
    }

    /// <summary>
    /// The source's hub id where it has one: config's `_name_or_path` when it is `org/name` (what save_pretrained
    /// records), else the `models--org--name` folder of a hub cache; null: only the directory name is known.
    /// </summary>
    static string? Identity(string sourceDir, string? nameOrPath)
    {
        var hubId = new Regex(@"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$");
        if (nameOrPath != null && hubId.IsMatch(nameOrPath) && !Directory.Exists(nameOrPath)) return nameOrPath;
        foreach (var part in Path.GetFullPath(sourceDir).Split(Path.DirectorySeparatorChar).Reverse())
            if (Regex.Match(part, @"^models--([^-].*?)--(.+)$") is { Success: true } m) return $"{m.Groups[1].Value}/{m.Groups[2].Value}";
        return null;
    }
}

/// <summary>
/// The flat part of a model card's YAML front matter: `key: value`, `key: [a, b]` and `key:` followed by `- item`
/// lines. Nested maps (model-index, widget) are skipped; a card without front matter gives no keys.
/// </summary>
public static class FrontMatter
{
    public static IReadOnlyDictionary<string, IReadOnlyList<string>> TryRead(string path)
    {
        try { return File.Exists(path) ? Parse(File.ReadAllText(path)) : new Dictionary<string, IReadOnlyList<string>>(); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return new Dictionary<string, IReadOnlyList<string>>(); }
    }

    public static IReadOnlyDictionary<string, IReadOnlyList<string>> Parse(string text)
    {
        var result = new Dictionary<string, IReadOnlyList<string>>();
        var lines = text.Replace("\r\n", "\n").Split('\n');
        if (lines.Length == 0 || lines[0].TrimEnd() != "---") return result;
        string? listKey = null;
        for (int i = 1; i < lines.Length; i++)
        {
            string line = lines[i];
            if (line.TrimEnd() is "---" or "...") return result;
            if (line.Trim().Length == 0 || line.TrimStart().StartsWith('#')) continue;
            if (listKey != null && Regex.Match(line, @"^\s*-\s+(.*)$") is { Success: true } item)
            {
                ((List<string>)result[listKey]).Add(Unquote(item.Groups[1].Value));
                continue;
            }
            if (char.IsWhiteSpace(line[0])) continue;   // inside a nested map
            listKey = null;
            var m = Regex.Match(line, @"^([A-Za-z_][A-Za-z0-9_-]*)\s*:\s*(.*)$");
            if (!m.Success) continue;
            string key = m.Groups[1].Value, value = StripComment(m.Groups[2].Value).Trim();
            if (value.Length == 0) { result[key] = new List<string>(); listKey = key; }
            else if (value.StartsWith('[') && value.EndsWith(']'))
                result[key] = value[1..^1].Split(',').Select(x => Unquote(x.Trim())).Where(x => x.Length > 0).ToList();
            else result[key] = new List<string> { Unquote(value) };
        }
        return new Dictionary<string, IReadOnlyList<string>>();   // no closing line: not front matter
    }

    static string StripComment(string v) => v.StartsWith('"') || v.StartsWith('\'') ? v : Regex.Replace(v, @"\s+#.*$", "");

    static string Unquote(string v)
    {
        v = v.Trim();
        if (v.Length >= 2 && v[0] == '\'' && v[^1] == '\'') return v[1..^1].Replace("''", "'");
        if (v.Length >= 2 && v[0] == '"' && v[^1] == '"') return Regex.Unescape(v[1..^1]);
        return v;
    }
}
