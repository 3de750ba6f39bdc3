using System.CommandLine;
using LlmSnp;
using LlmSnp.Evaluation;
using LlmSnp.Evaluation.Tasks;

/// <summary>`llmsnp eval ppl | tasks | accuracy | logits`: measure one checkpoint.</summary>
static class EvalCommand
{
    public static Command Build() => new("eval", "evaluate a checkpoint") { Perplexity(), Tasks(), Accuracy(), Logits() };

    static Command Perplexity()
    {
        var model = Cli.ModelOption();
        var dataset = new Option<string>("--dataset") { Description = "wikitext2, c4 (bundled sample), tinystories (bundled eval part) or a file (.json rows, .jsonl docs, text)", DefaultValueFactory = _ => "wikitext2" };
        var seqlen = new Option<int?>("--seqlen") { Description = "window length (default: 2048 or the model's max positions)" };
        var maxWindows = new Option<int?>("--max-windows") { Description = "evaluate only the first N windows" };
        var cmd = new Command("ppl", "perplexity with the published protocol (non-overlapping windows, tail dropped)") { model, dataset, seqlen, maxWindows, Cli.Device, Cli.DType, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => PerplexityJob.Run(p.GetValue(model)!, p.GetValue(dataset)!, p.GetValue(seqlen), p.GetValue(maxWindows),
            Cli.ComputeDevice(p), Cli.ComputeDType(p), Cli.Log).ToJson()));
        return cmd;
    }

    static Command Tasks()
    {
        var model = Cli.ModelOption();
        var tasks = new Option<string>("--tasks")
        {
            Description = $"comma-separated: {string.Join(", ", TaskCatalog.Known.Keys)} (bundled), or a .jsonl(.gz) file of the same format",
            Required = true,
        };
        var limit = new Option<int?>("--limit") { Description = "the first N documents of each task (of each BLiMP paradigm)" };
        var logSamples = new Option<string?>("--log-samples") { Description = "write one JSON line per document (loglikelihoods, is_greedy, continuation tokens) to this file" };
        var addBos = new Option<string>("--add-bos") { Description = "auto (the tokenizer's default, as lm-eval 0.4), true or false (as older lm-eval releases)", DefaultValueFactory = _ => "auto" };
        var cmd = new Command("tasks", "zero-shot accuracy scored as lm-evaluation-harness does (acc, acc_norm, stderr), streamed block by block")
            { model, tasks, limit, logSamples, addBos, Cli.Device, Cli.DType, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => TaskEvalJob.Run(p.GetValue(model)!, p.GetValue(tasks)!, p.GetValue(limit), BosPolicies.Parse(p.GetValue(addBos)!),
            p.GetValue(logSamples), Cli.ComputeDevice(p), Cli.ComputeDType(p), Cli.Log)));
        return cmd;
    }

    static Command Accuracy()
    {
        var model = Cli.ModelOption();
        var imagesDir = new Option<string>("--images") { Description = "folder with labels.tsv (file TAB class [TAB synset]); images in it or in images/", Required = true };
        var limit = new Option<int?>("--limit") { Description = "evaluate the first N images" };
        var batch = new Option<int>("--batch") { Description = "images per forward batch", DefaultValueFactory = _ => 32 };
        var cmd = new Command("accuracy", "top-1 / top-5 of an image classifier") { model, imagesDir, limit, batch, Cli.Device, Cli.DType, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => AccuracyJob.Run(p.GetValue(model)!, p.GetValue(imagesDir)!, p.GetValue(limit), p.GetValue(batch),
            Cli.ComputeDevice(p), Cli.ComputeDType(p), Cli.Log).ToJson()));
        return cmd;
    }

    static Command Logits()
    {
        var model = Cli.ModelOption();
        var ids = new Option<string?>("--ids") { Description = "comma-separated token ids (language models); image models use a fixed pattern image" };
        var cmd = new Command("logits", "float64 logits for one fixed input, for comparison with another runtime (tools/reference/stock_load_check.py)") { model, ids, Cli.Device, Cli.DType, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => LogitsDump.Run(p.GetValue(model)!, ParseIds(p.GetValue(ids)), Cli.ComputeDevice(p), Cli.ComputeDType(p))));
        return cmd;
    }

    internal static List<long>? ParseIds(string? ids) =>
        ids?.Split(',').Select(x => long.TryParse(x.Trim(), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var v) ? v
            : throw new LlmSnpException($"--ids: '{x}' is not a token id (a non-negative integer)")).ToList();
}
