using System.CommandLine;
using System.Text.Json.Nodes;
using LlmSnp;
using LlmSnp.Data;

/// <summary>`llmsnp tokenize`: token ids with a model's own tokenizer (the bundled OPT one without --model).</summary>
static class TokenizeCommand
{
    public static Command Build()
    {
        var model = new Option<string?>("--model") { Description = "model directory whose tokenizer to use: vocab.json + merges.txt, tokenizer.model or tokenizer.json (default: the bundled OPT tokenizer)" };
        var text = new Option<string?>("--text") { Description = "text to encode" };
        var file = new Option<string?>("--file") { Description = "file to encode" };
        var rows = new Option<bool>("--rows-json") { Description = "the file is a JSON array of rows, joined with \"\\n\\n\"" };
        var jsonl = new Option<bool>("--jsonl") { Description = "the file is JSON lines of {\"text\": ...}; one id array per document (a training corpus)" };
        var cmd = new Command("tokenize", "encode text with a model's tokenizer (default: the bundled OPT tokenizer), bos prepended as the model does") { model, text, file, rows, jsonl, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => Encode(p.GetValue(model), p.GetValue(text), p.GetValue(file), p.GetValue(rows), p.GetValue(jsonl))));
        return cmd;
    }

    // Without --model: the bundled OPT tokenizer, said so in the help; with it: the model's own, or an error.
    static ITextTokenizer Tokenizer(string? modelDir) => modelDir == null ? OptTokenizer.Bundled() : TextTokenizers.ForModel(modelDir);

    static JsonObject Encode(string? modelDir, string? text, string? file, bool rows, bool jsonl)
    {
        if ((text == null) == (file == null)) throw new LlmSnpException("tokenize: give exactly one of --text or --file");
        if (jsonl)
        {
            if (file == null) throw new LlmSnpException("tokenize: --jsonl needs --file");
            if (!File.Exists(file)) throw new LlmSnpException($"{file}: file not found");
            var tok = Tokenizer(modelDir);
            var docs = TextSources.ReadJsonl(file).Select(d => tok.Encode(d)).ToList();
            return new JsonObject
            {
                ["documents"] = docs.Count, ["count"] = docs.Sum(d => d.Length),
                ["ids"] = new JsonArray(docs.Select(d => (JsonNode)Ids(d)).ToArray()),
            };
        }
        string input = text ?? (rows ? string.Join("\n\n", TextSources.ReadRows(file!))
            : TextSources.ReadText(file!));
        var ids = Tokenizer(modelDir).Encode(input);
        return new JsonObject { ["count"] = ids.Length, ["ids"] = Ids(ids) };
    }

    static JsonArray Ids(int[] ids) => new(ids.Select(i => (JsonNode)i).ToArray());
}
