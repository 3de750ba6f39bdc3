using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Generation;
using LlmSnp.Models;
using LlmSnp.Pruning;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// Generation with a KV cache: greedy decoding against stories260K's reference sample, the cached logits against the
/// full (non-cached) forward, seeded sampling, the CLI, a pruned model, and the typed speed measurement.
/// </summary>
public class GenerationTests
{
    readonly ITestOutputHelper _out;
    public GenerationTests(ITestOutputHelper output) { _out = output; }

    static string Stories => Path.Combine(Repo.Root, "models", "stories260k");

    /// <summary>The full forward, every block in turn over the whole sequence (the path the golden tests check).</summary>
    static Tensor FullLogits(ILanguageModel m, Tensor ids) => LlamaTests.Forward(m, ids);

    /// <summary>
    /// The same ids through the cache in uneven pieces: a prefill, single tokens, a multi-token chunk past position 0
    /// (the explicit causal mask) and single tokens to the end; all logits kept.
    /// </summary>
    internal static Tensor CachedLogits(ILanguageModel m, Tensor ids)
    {
        int n = (int)ids.shape[1];
        var pieces = new List<int> { 5, 1, 1, 1, 3 };
        while (pieces.Sum() < n) pieces.Add(1);
        using var decoder = new CachedDecoder(m, n);
        var outs = new List<Tensor>();
        int at = 0;
        foreach (int len in pieces)
        {
            int take = Math.Min(len, n - at);
            if (take <= 0) break;
            outs.Add(decoder.Forward(ids.narrow(1, at, take), allLogits: true));
            at += take;
        }
        Assert.Equal(n, decoder.Position);
        var all = torch.cat(outs, 1);
        outs.ForEach(t => t.Dispose());
        return all;
    }

    /// <summary>
    /// F32: within 1e-5 of the largest logit's magnitude (stories260K's logits reach 22, where one F32 ulp is 2e-6 and the
    /// one-row GEMMs of a decode step round differently from the full sequence's; 1.7e-5 measured). F64 shows the two
    /// paths compute the same function: 1e-10.
    /// </summary>
    internal static void AssertCachedEqualsFull(ILanguageModel m, Tensor ids, string what)
    {
        using var full = FullLogits(m, ids);
        using var cached = CachedLogits(m, ids);
        Assert.Equal(full.shape, cached.shape);
        double maxAbs = (full - cached).abs().max().to(ScalarType.Float64).item<double>();
        double scale = full.abs().max().to(ScalarType.Float64).item<double>();
        double tol = m.ComputeDType == ScalarType.Float64 ? 1e-10 : 1e-5 * Math.Max(1, scale);
        Assert.True(maxAbs <= tol, $"{what} {m.ComputeDType}: max |cached − full| = {maxAbs:G3} (logits up to {scale:G3}) > {tol:G3}");
    }

    static readonly ScalarType[] DTypes = { ScalarType.Float32, ScalarType.Float64 };

    static Tensor Ids(IEnumerable<int> ids) { var a = ids.Select(x => (long)x).ToArray(); return torch.tensor(a, new long[] { 1, a.Length }); }

    static JsonElement Sample() => JsonDocument.Parse(File.ReadAllText(Path.Combine(Stories, "greedy-sample.json"))).RootElement;

    [Fact]
    public void Greedy_decoding_of_stories260k_from_bos_reproduces_the_authors_reference_sample()
    {
        var sample = Sample();
        var want = sample.GetProperty("ids").EnumerateArray().Select(x => x.GetInt32()).ToArray();
        using var model = ModelFamilies.OpenLanguageModel(Stories);
        var streamed = new System.Text.StringBuilder();
        var r = TextGeneration.Generate(model, "", new GenerationOptions { MaxNewTokens = 256 }, piece => streamed.Append(piece));
        Assert.Equal(want, r.Tokens.PromptIds.Concat(r.Tokens.NewIds).ToArray());
        Assert.Equal(StopReasons.MaxNewTokens, r.Tokens.StopReason);
        Assert.Equal(sample.GetProperty("text").GetString(), r.Text);
        Assert.Equal(r.Text, streamed.ToString());   // the streamed pieces add up to the text
        Assert.Equal(255, r.Tokens.DecodeSteps);
        _out.WriteLine($"prefill {r.Tokens.PrefillTokensPerSecond:F1} tokens/s, decode {r.Tokens.DecodeMsPerToken:F3} ms/token");
    }

    [Fact]
    public void Cached_logits_equal_the_full_forward_for_opt()
    {
        using var tmp = new TempDir();
        // Pre-LN and post-LN with projections and an untied head: the learned positions come from EmbedAt's offset.
        foreach (var (name, spec) in new[] { ("pre", new TinyOpt()), ("post", new TinyOpt { PreLayerNorm = false, ProjDim = 16, Tied = false, Seed = 7 }) })
        {
            string dir = spec.Write(tmp.Sub(name));
            using var ids = torch.randint(0, spec.Vocab, new long[] { 1, 20 }, generator: new torch.Generator(3));
            foreach (var dtype in DTypes)
                using (var model = new OptModel(dir, CPU, dtype)) AssertCachedEqualsFull(model, ids, $"opt {name}");
        }
    }

    [Theory]
    [InlineData("stories260k")]
    [InlineData("golden-llama/llama-gqa-untied")]
    [InlineData("golden-llama/qwen2-bias-tied")]
    public void Cached_logits_equal_the_full_forward_for_llama(string fixture)
    {
        string dir = fixture == "stories260k" ? Stories : Repo.Fixture(fixture);
        using var ids = Ids(Sample().GetProperty("ids").EnumerateArray().Take(40).Select(x => x.GetInt32()));
        foreach (var dtype in DTypes)
            using (var model = ModelFamilies.OpenLanguageModel(dir, CPU, dtype)) AssertCachedEqualsFull(model, ids, fixture);
    }

    /// <summary>With a window of 5 over 24 tokens the cached path must drop keys more than 5 back, as the full forward's mask does.</summary>
    [Fact]
    public void Cached_logits_equal_the_full_forward_for_mistral_with_a_short_sliding_window()
    {
        string src = Repo.Fixture("golden-llama/mistral-f16");
        using var tmp = new TempDir();
        string dir = LlamaTests.MistralWithWindow(tmp, 5);
        using var ids = torch.arange(3, 27, dtype: ScalarType.Int64).unsqueeze(0);
        using (var f64 = ModelFamilies.OpenLanguageModel(dir, CPU, ScalarType.Float64)) AssertCachedEqualsFull(f64, ids, "mistral window 5");
        using var windowed = ModelFamilies.OpenLanguageModel(dir);
        AssertCachedEqualsFull(windowed, ids, "mistral window 5");
        // The window matters here: without it the cached logits past position 5 differ.
        using var unwindowed = ModelFamilies.OpenLanguageModel(src);
        using var a = CachedLogits(windowed, ids);
        using var b = CachedLogits(unwindowed, ids);
        Assert.True((a.narrow(1, 6, 18) - b.narrow(1, 6, 18)).abs().max().item<float>() > 1e-4);
    }

    [Fact]
    public void Seeded_sampling_is_deterministic_and_a_tiny_nucleus_is_greedy()
    {
        using var model = ModelFamilies.OpenLanguageModel(Stories);
        var tok = model.Tokenizer();
        int[] prompt = tok.Encode("Once upon a time");
        int[] Run(GenerationOptions o) => TextGeneration.Generate(model, prompt, o, tok.EosId).NewIds.ToArray();
        var sampled = new GenerationOptions { MaxNewTokens = 48, Temperature = 1.0, TopP = 0.95, Seed = 11 };
        var a = Run(sampled);
        Assert.Equal(a, Run(sampled));
        Assert.NotEqual(a, Run(sampled with { Seed = 12 }));
        var greedy = Run(new GenerationOptions { MaxNewTokens = 48 });
        Assert.NotEqual(greedy, a);
        Assert.Equal(greedy, Run(sampled with { TopP = 1e-9 }));
        Assert.Equal(greedy, Run(sampled with { TopP = 1e-9, Temperature = 3, Seed = 5 }));
        Assert.Throws<LlmSnpException>(() => Run(sampled with { TopP = 0 }));
        Assert.Throws<LlmSnpException>(() => Run(sampled with { Temperature = -1 }));
    }

    [Fact]
    public void Generation_stops_at_the_models_max_positions()
    {
        using var tmp = new TempDir();
        using var model = new OptModel(new TinyOpt { MaxPositions = 12 }.Write(tmp.Sub("m")), CPU, ScalarType.Float32);
        var g = TextGeneration.Generate(model, new[] { 2, 5, 6 }, new GenerationOptions { MaxNewTokens = 100 }, eosId: null);
        Assert.Equal(StopReasons.MaxPositions, g.StopReason);
        Assert.Equal(12, g.PromptIds.Count + g.NewIds.Count);
        var e = Assert.Throws<LlmSnpException>(() => TextGeneration.Generate(model, Enumerable.Repeat(5, 13).ToArray(), new GenerationOptions(), null));
        Assert.Contains("max_position_embeddings", e.Message);
    }

    /// <summary>A pruned stories260K (per-layer K/V groups and neurons: each block's cache has its own width) decodes like its full forward.</summary>
    [Fact]
    public void A_pruned_model_generates_and_its_cached_logits_equal_its_full_forward()
    {
        using var tmp = new TempDir();
        PruneJob.Run(new PruneJobOptions
        {
            ModelDir = Stories, OutDir = tmp.Sub("out"), Prune = new PruneOptions { Policy = RatioPolicyKind.Budget, Amount = 0.3 },
            CalibSource = TextSources.TinyStories, CalibSamples = 8, CalibSeqLen = 128,
        }, null);
        using var pruned = ModelFamilies.OpenLanguageModel(tmp.Sub("out"));
        Assert.True(((LlamaModel)pruned).Config.KvHeadsPerLayer.Distinct().Count() > 1 || ((LlamaModel)pruned).Config.IntermediateSizes.Any(f => f < 172));
        using var ids = Ids(Sample().GetProperty("ids").EnumerateArray().Take(40).Select(x => x.GetInt32()));
        AssertCachedEqualsFull(pruned, ids, "pruned stories260k");
        using (var f64 = ModelFamilies.OpenLanguageModel(tmp.Sub("out"), CPU, ScalarType.Float64)) AssertCachedEqualsFull(f64, ids, "pruned stories260k");
        var r = TextGeneration.Generate(pruned, "Once upon a time", new GenerationOptions { MaxNewTokens = 40 });
        Assert.True(r.Tokens.NewIds.Count > 0 && r.Text.Length > 0);
        _out.WriteLine(r.Text);
    }

    [Fact]
    public void Measured_speed_is_typed_positive_and_consistent()
    {
        using var model = ModelFamilies.OpenLanguageModel(Stories);
        var s = TextGeneration.MeasureSpeed(model, promptLength: 128, decodeSteps: 32);
        _out.WriteLine(s.ToJson().ToJsonString());
        Assert.Equal("llama", s.Family);
        Assert.Equal("float32", s.DType);
        Assert.True(s.Threads >= 1);
        Assert.Equal(128, s.PromptLength);
        Assert.Equal(32, s.DecodeSteps);
        Assert.True(s.PrefillSeconds > 0 && s.DecodeSeconds > 0 && s.PrefillTokensPerSecond > 0 && s.DecodeMsPerToken > 0);
        Assert.Equal(s.PromptLength, s.PrefillTokensPerSecond * s.PrefillSeconds, 6);   // tokens/s × s = tokens
        Assert.Equal(s.DecodeSeconds, s.DecodeMsPerToken * s.DecodeSteps / 1000, 9);
        Assert.Throws<LlmSnpException>(() => TextGeneration.MeasureSpeed(model, 500, 100));   // past 512 positions
    }

    [Fact]
    public void Cli_generate_streams_the_text_and_writes_the_json()
    {
        using var tmp = new TempDir();
        string json = tmp.Sub("g.json");
        var r = CliHarness.Run(new[] { "generate", "--model", Stories, "--prompt", "", "--max-new-tokens", "30", "--json", json });
        string stdout = CliHarness.Succeeds(r);
        string want = Sample().GetProperty("text").GetString()!;
        var result = JsonNode.Parse(File.ReadAllText(json))!;
        Assert.Equal(30, (int)result["new_tokens"]!);
        Assert.StartsWith((string)result["text"]!, want);
        Assert.Equal((string)result["text"]! + "\n", stdout);
        Assert.Contains("prefill", r.Stderr);
        Assert.Contains("ms/token", r.Stderr);
        Assert.True((double)result["prefill_tokens_per_second"]! > 0 && (double)result["decode_ms_per_token"]! > 0);
    }

    [Fact]
    public void Cli_generate_refuses_an_image_model_a_too_long_prompt_and_a_bad_top_p_with_one_line()
    {
        var vit = CliHarness.Run(new[] { "generate", "--model", Path.Combine("models", "vit-tiny"), "--prompt", "hi" });
        _out.WriteLine(CliHarness.FailsWithOneLine(vit, onlyLine: true, 1, "image classifier"));
        var tooLong = CliHarness.Run(new[] { "generate", "--model", Stories, "--prompt", string.Concat(Enumerable.Repeat("Lily ", 600)) });
        _out.WriteLine(CliHarness.FailsWithOneLine(tooLong, onlyLine: true, 1, "max_position_embeddings"));
        foreach (var bad in new[] { "0", "1.5", "x" })
        {
            var r = CliHarness.Run(new[] { "generate", "--model", Stories, "--prompt", "hi", "--top-p", bad });
            _out.WriteLine(CliHarness.FailsWithOneLine(r, onlyLine: true, 1, "--top-p"));
        }
    }
}
