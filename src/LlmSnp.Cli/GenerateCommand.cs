using System.CommandLine;
using LlmSnp;
using LlmSnp.Checkpoint;
using LlmSnp.Generation;
using LlmSnp.Models;

/// <summary>
/// `llmsnp generate`: text from a language model with a KV cache. Unlike the other commands, stdout is the text
/// itself (the prompt, then the continuation as it is produced); the statistics go to stderr and the typed
/// result to --json FILE. Errors are one line and exit 1, as everywhere.
/// </summary>
static class GenerateCommand
{
    public static Command Build()
    {
        var model = new Option<string>("--model") { Description = "checkpoint directory in HF layout (an OPT or LLaMA-family language model)", Required = true };
        var prompt = new Option<string>("--prompt") { Description = "text to continue; empty starts from bos", Required = true };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "tokens to generate at most (also stops at eos and at the model's max positions)", DefaultValueFactory = _ => 128 };
        var temperature = new Option<double>("--temperature") { Description = "0 = greedy (argmax); above 0 samples softmax(logits / T)", DefaultValueFactory = _ => 0.0 };
        var topP = new Option<double>("--top-p") { Description = "nucleus sampling: draw from the most likely tokens holding this much probability, in (0, 1]", DefaultValueFactory = _ => 1.0 };
        var seed = new Option<int>("--seed") { Description = "seed of the sampling (the same seed gives the same text)", DefaultValueFactory = _ => 0 };
        var device = new Option<string>("--device") { Description = "cpu or cuda", DefaultValueFactory = _ => "cpu" };
        var dtype = new Option<string?>("--dtype") { Description = "compute dtype: float32 (default), bfloat16, float64" };
        var json = new Option<string?>("--json") { Description = "write the result (ids, text, speed) as JSON to this file" };
        var cmd = new Command("generate", "generate text with a KV cache, streamed to stdout; prompt/new tokens, prefill tokens/s and decode ms/token on stderr")
            { model, prompt, maxNew, temperature, topP, seed, device, dtype, json };
        cmd.SetAction(p => Guard(() =>
        {
            var options = new GenerationOptions
            {
                MaxNewTokens = p.GetValue(maxNew), Temperature = p.GetValue(temperature), TopP = p.GetValue(topP), Seed = p.GetValue(seed),
            };
            var computeDType = p.GetValue(dtype) is string s ? SafeDTypes.ParseOption(s) : TorchSharp.torch.ScalarType.Float32;
            using var lm = ModelFamilies.OpenLanguageModel(p.GetValue(model)!, Runtime.ParseDevice(p.GetValue(device)!), computeDType, "generate");
            string text = p.GetValue(prompt)!;
            var stdout = Console.Out;
            // The prompt goes out with the first piece, so that an error before generation (a prompt past the model's
            // max positions) leaves stdout empty: the one error line is all the output.
            bool started = false;
            void Write(string piece)
            {
                if (!started) { stdout.Write(text); started = true; }
                stdout.Write(piece);
                stdout.Flush();
            }
            var r = TextGeneration.Generate(lm, text, options, Write);
            Write("\n");
            var g = r.Tokens;
            Cli.Log($"prompt tokens {g.PromptIds.Count}, new tokens {g.NewIds.Count} (stop: {g.StopReason}); " +
                $"prefill {g.PrefillTokensPerSecond:F1} tokens/s, decode {(g.DecodeMsPerToken is double ms ? $"{ms:F2} ms/token" : "no steps")}; {g.DType}, {g.Threads} threads");
            if (p.GetValue(json) is string path) AtomicFile.WriteAllText(path, r.ToJson().ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }) + "\n");
        }));
        return cmd;
    }

    /// <summary>The error handling of Cli.Run for a command whose stdout is not a JSON result.</summary>
    static int Guard(Action body)
    {
        try
        {
            body();
            return 0;
        }
        catch (Exception e) { return Cli.Fail(e); }
    }
}
