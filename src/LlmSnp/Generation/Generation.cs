using LlmSnp.Models;
using System.Diagnostics;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Generation;

/// <summary>How to generate: greedy at temperature 0, else nucleus sampling with a seed.</summary>
public sealed record GenerationOptions
{
    public int MaxNewTokens { get; init; } = 128;
    public double Temperature { get; init; }
    public double TopP { get; init; } = 1;
    public int Seed { get; init; }

    public void Validate()
    {
        if (MaxNewTokens < 1) throw new LlmSnpException($"max-new-tokens must be at least 1 (got {MaxNewTokens})");
        if (!double.IsFinite(Temperature) || Temperature < 0) throw new LlmSnpException($"temperature must be a number ≥ 0 (got {Temperature})");
        if (!(TopP > 0 && TopP <= 1)) throw new LlmSnpException($"top-p must be in (0, 1] (got {TopP})");
    }
}

/// <summary>Why generation stopped.</summary>
public static class StopReasons
{
    public const string Eos = "eos", MaxNewTokens = "max_new_tokens", MaxPositions = "max_positions";
}

/// <summary>
/// Generated ids and how long they took: prefill is the prompt's one forward, decode the steps after it (one token
/// fed, one sampled, each); the first new token comes from the prefill's logits, so decode steps = new tokens − 1.
/// </summary>
public sealed record TokenGeneration(IReadOnlyList<int> PromptIds, IReadOnlyList<int> NewIds, string StopReason,
    double PrefillSeconds, int DecodeSteps, double DecodeSeconds, string DType, int Threads)
{
    public double PrefillTokensPerSecond => PromptIds.Count / Math.Max(PrefillSeconds, 1e-12);
    /// <summary>Null when one token was generated: there was no decode step to time.</summary>
    public double? DecodeMsPerToken => DecodeSteps > 0 ? 1000 * DecodeSeconds / DecodeSteps : null;
}

/// <summary>A text generation: the prompt, the continuation's text, and the token-level record.</summary>
public sealed record GenerationResult(string Model, string Family, string Prompt, string Text, GenerationOptions Options, TokenGeneration Tokens)
{
    public JsonObject ToJson() => new()
    {
        ["model"] = Model, ["family"] = Family, ["dtype"] = Tokens.DType, ["threads"] = Tokens.Threads,
        ["prompt"] = Prompt, ["text"] = Text,
        ["max_new_tokens"] = Options.MaxNewTokens, ["temperature"] = Options.Temperature, ["top_p"] = Options.TopP, ["seed"] = Options.Seed,
        ["stop_reason"] = Tokens.StopReason,
        ["prompt_tokens"] = Tokens.PromptIds.Count, ["new_tokens"] = Tokens.NewIds.Count,
        ["prompt_ids"] = Ints(Tokens.PromptIds), ["new_ids"] = Ints(Tokens.NewIds),
        ["prefill_seconds"] = Tokens.PrefillSeconds, ["prefill_tokens_per_second"] = Tokens.PrefillTokensPerSecond,
        ["decode_steps"] = Tokens.DecodeSteps, ["decode_seconds"] = Tokens.DecodeSeconds, ["decode_ms_per_token"] = Tokens.DecodeMsPerToken,
    };

    static JsonArray Ints(IEnumerable<int> xs) => new(xs.Select(x => (JsonNode)x).ToArray());
}

/// <summary>
/// Inference speed of LlmSnp's own cached forward, batch 1: prefill of <see cref="PromptLength"/> tokens in one forward
/// (logits of the last position only, as generation needs), then <see cref="DecodeSteps"/> single-token steps.
/// </summary>
public sealed record InferenceSpeed(string Family, string DType, int Threads, int PromptLength, double PrefillSeconds, int DecodeSteps, double DecodeSeconds)
{
    public double PrefillTokensPerSecond => PromptLength / Math.Max(PrefillSeconds, 1e-12);
    public double DecodeMsPerToken => 1000 * DecodeSeconds / DecodeSteps;

    public JsonObject ToJson() => new()
    {
        ["family"] = Family, ["dtype"] = DType, ["threads"] = Threads,
        ["prompt_length"] = PromptLength, ["prefill_seconds"] = PrefillSeconds, ["prefill_tokens_per_second"] = PrefillTokensPerSecond,
        ["decode_steps"] = DecodeSteps, ["decode_seconds"] = DecodeSeconds, ["decode_ms_per_token"] = DecodeMsPerToken,
    };
}

/// <summary>Text generation with a KV cache (prefill the prompt, then one token per step), and its measured speed.</summary>
public static class TextGeneration
{
    /// <summary>Intra-op threads libtorch uses (GEMM threads follow MKL/OMP_NUM_THREADS, set by Runtime.ConfigureThreads).</summary>
    static int Threads => torch.get_num_threads();

    /// <summary>
    /// Continues <paramref name="promptIds"/> until the tokenizer's eos (<paramref name="eosId"/>), max-new-tokens, or the
    /// model's max positions; <paramref name="onToken"/> sees each new id as it is chosen.
    /// </summary>
    public static TokenGeneration Generate(ILanguageModel model, IReadOnlyList<int> promptIds, GenerationOptions options, int? eosId, Action<int>? onToken = null) =>
        GenerateUntil(model, promptIds, options, eosId is int e ? new[] { e } : Array.Empty<int>(), onToken);

    /// <summary>The same, stopping at any of <paramref name="eosIds"/> (a model may have several end tokens).</summary>
    public static TokenGeneration GenerateUntil(ILanguageModel model, IReadOnlyList<int> promptIds, GenerationOptions options, IReadOnlyCollection<int> eosIds, Action<int>? onToken = null)
    {
        options.Validate();
        if (promptIds.Count == 0) throw new LlmSnpException("generation needs at least one prompt token");
        if (promptIds.Count > model.MaxPositions)
            throw new LlmSnpException($"the prompt's {promptIds.Count} tokens exceed the model's max_position_embeddings ({model.MaxPositions})");
        // The last new token is never fed back, so the caches need the prompt and max-new-tokens − 1 more.
        int capacity = (int)Math.Min(model.MaxPositions, (long)promptIds.Count + options.MaxNewTokens - 1);
        using var decoder = new CachedDecoder(model, Math.Max(capacity, promptIds.Count));
        using var sampler = new Sampler(options.Temperature, options.TopP, options.Seed);
        var newIds = new List<int>();
        var sw = Stopwatch.StartNew();
        int next;
        using (var scope = NewDisposeScope())
        {
            var ids = torch.tensor(promptIds.Select(i => (long)i).ToArray(), new long[] { 1, promptIds.Count }).to(model.Device);
            next = sampler.Next(Checked(decoder.Forward(ids)[0, -1], model));
        }
        double prefill = sw.Elapsed.TotalSeconds;
        sw.Restart();
        int steps = 0;
        string stop;
        while (true)
        {
            newIds.Add(next);
            onToken?.Invoke(next);
            if (eosIds.Contains(next)) { stop = StopReasons.Eos; break; }
            if (newIds.Count >= options.MaxNewTokens) { stop = StopReasons.MaxNewTokens; break; }
            if (promptIds.Count + newIds.Count >= model.MaxPositions) { stop = StopReasons.MaxPositions; break; }
            // One scope per step: the step's activations and logits go, the caches (detached) stay.
            using var scope = NewDisposeScope();
            using var one = torch.tensor(new long[] { next }, new long[] { 1, 1 }).to(model.Device);
            next = sampler.Next(Checked(decoder.Forward(one)[0, -1], model));
            steps++;
        }
        // Time spent in onToken (printing) counts too: it is part of what a user waits for, and is small.
        return new TokenGeneration(promptIds.ToArray(), newIds, stop, prefill, steps, sw.Elapsed.TotalSeconds, SafeDTypes.ConfigName(model.ComputeDType), Threads);
    }

    /// <summary>The logits of one position, refused when not finite (as perplexity refuses them) instead of sampled into garbage.</summary>
    static Tensor Checked(Tensor logits, ILanguageModel model)
    {
        FiniteLogits.Require(logits, model.ModelDir);
        return logits;
    }

    /// <summary>
    /// Generates from a text prompt with the model's own tokenizer (an empty prompt starts from bos), handing the decoded
    /// text to <paramref name="onText"/> piece by piece as tokens are produced.
    /// </summary>
    public static GenerationResult Generate(ILanguageModel model, string prompt, GenerationOptions options, Action<string>? onText = null)
    {
        options.Validate();
        var tok = model.Tokenizer();
        int[] promptIds = prompt.Length == 0
            ? tok.BosId is int bos ? new[] { bos } : throw new LlmSnpException($"{tok.Description}: no bos token to start an empty prompt from; give a prompt")
            : tok.Encode(prompt);
        if (promptIds.Length == 0) throw new LlmSnpException($"the prompt encodes to no tokens with {tok.Description}");
        // The continuation's text is the decoded whole minus the decoded prompt: a piece's leading space (SentencePiece's ▁)
        // then survives, which decoding the new ids alone would strip.
        string promptText = tok.Decode(promptIds);
        var all = new List<int>(promptIds);
        string Continuation()
        {
            string full = tok.Decode(all);
            return full.StartsWith(promptText, StringComparison.Ordinal) ? full[promptText.Length..] : tok.Decode(all.Skip(promptIds.Length));
        }
        // Streaming decodes only a short window (re-decoding the whole sequence cost 23 ms a token on stories260K, measured):
        // the text of ids[from..] minus that of ids[from..shownUpTo] is what the new ids add, their leading space included
        // because the window starts a few tokens earlier.
        int from = Math.Max(0, promptIds.Length - 4), shownUpTo = promptIds.Length;
        void Show(bool final)
        {
            if (all.Count == shownUpTo) return;
            string before = tok.Decode(all.GetRange(from, shownUpTo - from)), now = tok.Decode(all.GetRange(from, all.Count - from));
            // A byte-fallback character split over tokens decodes as U+FFFD until its last byte arrives: hold it back.
            if (!final && (now.EndsWith('\uFFFD') || !now.StartsWith(before, StringComparison.Ordinal))) return;
            if (now.Length > before.Length && now.StartsWith(before, StringComparison.Ordinal)) onText?.Invoke(now[before.Length..]);
            from = shownUpTo;
            shownUpTo = all.Count;
        }
        var gen = GenerateUntil(model, promptIds, options, tok.EosIds, id => { all.Add(id); Show(final: false); });
        Show(final: true);
        return new GenerationResult(model.ModelDir, model.Family, prompt, Continuation(), options, gen);
    }

    /// <summary>
    /// Batch-1 speed of the cached forward: a warm-up sequence, then a prefill of <paramref name="promptLength"/> tokens and
    /// <paramref name="decodeSteps"/> greedy single-token steps, timed apart. Token ids cycle through the vocabulary (speed does not depend on them).
    /// </summary>
    public static InferenceSpeed MeasureSpeed(ILanguageModel model, int promptLength, int decodeSteps)
    {
        if (promptLength < 1 || decodeSteps < 1) throw new LlmSnpException($"speed needs a prompt of at least 1 token and at least 1 decode step (got {promptLength}, {decodeSteps})");
        if ((long)promptLength + decodeSteps > model.MaxPositions)
            throw new LlmSnpException($"prompt {promptLength} + {decodeSteps} decode steps exceed the model's max_position_embeddings ({model.MaxPositions})");
        using var decoder = new CachedDecoder(model, promptLength + decodeSteps);
        var ids = Enumerable.Range(0, promptLength).Select(i => (long)(i % model.VocabSize)).ToArray();
        using var prompt = torch.tensor(ids, new long[] { 1, promptLength }).to(model.Device);
        // Warm-up: first calls allocate the caches and pick kernels.
        using (var scope = NewDisposeScope())
        {
            int warm = Math.Min(promptLength, 8);
            decoder.Forward(prompt.narrow(1, 0, warm));
            decoder.Forward(prompt.narrow(1, 0, 1));
        }
        decoder.Reset();
        var sw = Stopwatch.StartNew();
        long next;
        using (var scope = NewDisposeScope()) next = decoder.Forward(prompt)[0, -1].argmax().item<long>();
        double prefill = sw.Elapsed.TotalSeconds;
        sw.Restart();
        for (int s = 0; s < decodeSteps; s++)
        {
            using var scope = NewDisposeScope();
            using var one = torch.tensor(new[] { next }, new long[] { 1, 1 }).to(model.Device);
            next = decoder.Forward(one)[0, -1].argmax().item<long>();
        }
        return new InferenceSpeed(model.Family, SafeDTypes.ConfigName(model.ComputeDType), Threads, promptLength, prefill, decodeSteps, sw.Elapsed.TotalSeconds);
    }
}
