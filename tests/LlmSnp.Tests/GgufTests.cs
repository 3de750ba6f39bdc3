using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Evaluation;
using LlmSnp.Export;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// GGUF export of the LLaMA family, checked three ways: the file parsed back by an independent
/// reader; llama.cpp itself (LLamaSharp) computing perplexity on the exported file, against the
/// float64 reference of the dense model and against an independent float64 forward of per-layer
/// and uniformly pruned checkpoints built here by slicing; and bad inputs refused in one line with
/// nothing left behind.
/// </summary>
public sealed class GgufTests : IDisposable
{
    static readonly string Stories = Path.Combine(Repo.Root, "models", "stories260k");
    static readonly string EvalIdsPath = Path.Combine(Repo.Root, "eval", "data", "tinystories", "eval.ids.json");
    const int SeqLen = 512, Windows = 40;
    const int Hidden = 64, Layers = 5, HeadDim = 8, DenseHeads = 8, DenseKv = 4, DenseFfn = 172;

    static readonly Lazy<int[]> EvalIdsLazy = new(() => JsonSerializer.Deserialize<int[]>(File.ReadAllBytes(EvalIdsPath))!);
    static int[] EvalIds => EvalIdsLazy.Value;

    static double DenseReference
    {
        get
        {
            var r = JsonNode.Parse(File.ReadAllText(Path.Combine(Stories, "reference.json")))!["tinystories_eval_512_first40"]!;
            Assert.Equal(40, (int)r["windows"]!);
            Assert.Equal(512, (int)r["seqlen"]!);
            return (double)r["perplexity"]!;
        }
    }

    readonly string _tmp;
    readonly ITestOutputHelper _out;

    public GgufTests(ITestOutputHelper output)
    {
        _out = output;
        _tmp = Path.Combine(Path.GetTempPath(), "llmsnp-gguf-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(_tmp);
    }

    public void Dispose()
    {
        try { Directory.Delete(_tmp, true); } catch (IOException) { }
    }

    static Dictionary<string, Tensor> DenseTensors()
    {
        using var r = new CheckpointReader(Stories);
        return r.Names.ToDictionary(n => n, n => r.Read(n, ScalarType.Float32, CPU));
    }

    // ------------------------------------------------------------------ structure

    [Fact]
    public void Dense_export_parses_back_with_the_expected_header_metadata_and_layout()
    {
        var dense = DenseTensors();
        foreach (var dtype in new[] { GgufDType.F32, GgufDType.F16 })
        {
            string path = Path.Combine(_tmp, $"s-{dtype}.gguf");
            var res = GgufExport.Run(Stories, path, dtype);
            Assert.Equal("llama", res.Architecture);
            Assert.Equal(new FileInfo(path).Length, res.Bytes);
            var g = GgufFile.Read(path);
            Assert.Equal(3u, g.Version);
            Assert.Equal("general.architecture", g.KeyOrder[1]);   // after general.alignment
            Assert.Equal(32u, g.Scalar<uint>("general.alignment"));
            Assert.Equal(dtype == GgufDType.F32 ? 0u : 1u, g.Scalar<uint>("general.file_type"));
            Assert.Equal("llama", g.Scalar<string>("general.architecture"));
            Assert.Equal(512u, g.Scalar<uint>("llama.context_length"));
            Assert.Equal(64u, g.Scalar<uint>("llama.embedding_length"));
            Assert.Equal(5u, g.Scalar<uint>("llama.block_count"));
            Assert.Equal(172u, g.Scalar<uint>("llama.feed_forward_length"));
            Assert.Equal(8u, g.Scalar<uint>("llama.attention.head_count"));
            Assert.Equal(4u, g.Scalar<uint>("llama.attention.head_count_kv"));
            Assert.Equal(8u, g.Scalar<uint>("llama.attention.key_length"));
            Assert.Equal(8u, g.Scalar<uint>("llama.attention.value_length"));
            Assert.Equal(8u, g.Scalar<uint>("llama.rope.dimension_count"));
            Assert.Equal(10000f, g.Scalar<float>("llama.rope.freq_base"));
            Assert.Equal(1e-5f, g.Scalar<float>("llama.attention.layer_norm_rms_epsilon"));
            Assert.Equal(512u, g.Scalar<uint>("llama.vocab_size"));

            // Vocabulary: against the tokenizer.model bytes, read here with the repo's tokenizer library.
            Assert.Equal("llama", g.Scalar<string>("tokenizer.ggml.model"));
            var tokens = g.Array<string>("tokenizer.ggml.tokens");
            var scores = g.Array<float>("tokenizer.ggml.scores");
            var types = g.Array<int>("tokenizer.ggml.token_type");
            Assert.Equal(8u, g.ArrayType("tokenizer.ggml.tokens"));
            Assert.Equal(5u, g.ArrayType("tokenizer.ggml.token_type"));   // int32
            Assert.Equal(512, tokens.Length);
            Assert.Equal(512, scores.Length);
            Assert.Equal(new[] { "<unk>", "<s>", "</s>", "<0x00>" }, tokens[..4]);
            Assert.Equal(new[] { 2, 3, 3 }, types[..3]);                   // unknown, control, control
            Assert.All(types[3..259], t => Assert.Equal(6, t));     // the 256 byte pieces
            Assert.All(types[259..], t => Assert.Equal(1, t));      // normal
            using (var s = File.OpenRead(Path.Combine(Stories, "tokenizer.model")))
            {
                var tok = Microsoft.ML.Tokenizers.LlamaTokenizer.Create(s, addBeginOfSentence: false, addEndOfSentence: false);
                for (int id = 259; id < 512; id += 17) Assert.Equal(tok.Vocabulary.First(kv => kv.Value == id).Key, tokens[id]);
            }
            Assert.Equal(0f, scores[0]);
            Assert.True(scores[300] < 0);
            Assert.Equal(1u, g.Scalar<uint>("tokenizer.ggml.bos_token_id"));
            Assert.Equal(2u, g.Scalar<uint>("tokenizer.ggml.eos_token_id"));
            Assert.Equal(0u, g.Scalar<uint>("tokenizer.ggml.unknown_token_id"));
            Assert.True(g.Scalar<bool>("tokenizer.ggml.add_bos_token"));
            Assert.False(g.Scalar<bool>("tokenizer.ggml.add_eos_token"));
            Assert.True(g.Scalar<bool>("tokenizer.ggml.add_space_prefix"));

            // Tensors: 2 + 9 per layer (no output.weight: tied), ne reversed from PyTorch shapes, aligned and packed.
            Assert.Equal(2 + 9 * Layers, g.Tensors.Count);
            Assert.Equal(g.Tensors.Count, res.TensorCount);
            Assert.DoesNotContain(g.Tensors, t => t.Name == "output.weight");
            Assert.Equal(new ulong[] { 64, 512 }, g.Tensor("token_embd.weight").Ne);
            Assert.Equal(new ulong[] { 64, 64 }, g.Tensor("blk.0.attn_q.weight").Ne);
            Assert.Equal(new ulong[] { 64, 32 }, g.Tensor("blk.3.attn_k.weight").Ne);
            Assert.Equal(new ulong[] { 64, 172 }, g.Tensor("blk.4.ffn_up.weight").Ne);
            Assert.Equal(new ulong[] { 172, 64 }, g.Tensor("blk.4.ffn_down.weight").Ne);
            Assert.Equal(new ulong[] { 64 }, g.Tensor("blk.2.ffn_norm.weight").Ne);
            ulong expected = 0;
            foreach (var t in g.Tensors)
            {
                Assert.Equal(expected, t.Offset);
                Assert.Equal(0ul, t.Offset % 32);
                Assert.Equal(t.Ne.Length == 2 && dtype == GgufDType.F16 ? 1u : 0u, t.Type);
                long size = GgufFile.ByteSize(t);
                long padded = (size + 31) / 32 * 32;
                for (long k = size; k < padded; k++) Assert.Equal(0, g.Bytes[g.DataStart + (long)t.Offset + k]);
                expected += (ulong)padded;
            }
            Assert.Equal(g.DataStart + (long)expected, g.Bytes.Length);
            Assert.Equal(0, g.DataStart % 32);

            // Values: unpermuted tensors are the checkpoint's (rounded to F16 where F16); q/k rows against the index formula.
            double tol = dtype == GgufDType.F32 ? 0 : 1e-3;
            AssertClose(dense["model.embed_tokens.weight"], g.Values("token_embd.weight"), tol);
            AssertClose(dense["model.layers.2.mlp.down_proj.weight"], g.Values("blk.2.ffn_down.weight"), tol);
            AssertClose(dense["model.layers.2.input_layernorm.weight"], g.Values("blk.2.attn_norm.weight"), 0);
            for (int layer = 0; layer < Layers; layer++)
            {
                AssertInterleaved(dense[$"model.layers.{layer}.self_attn.q_proj.weight"], g.Values($"blk.{layer}.attn_q.weight"), DenseHeads, tol);
                AssertInterleaved(dense[$"model.layers.{layer}.self_attn.k_proj.weight"], g.Values($"blk.{layer}.attn_k.weight"), DenseKv, tol);
                AssertClose(dense[$"model.layers.{layer}.self_attn.v_proj.weight"], g.Values($"blk.{layer}.attn_v.weight"), tol);
            }
        }
    }

    static void AssertClose(Tensor expected, double[] actual, double tol)
    {
        var e = expected.to(ScalarType.Float64).contiguous().data<double>().ToArray();
        Assert.Equal(e.Length, actual.Length);
        for (int i = 0; i < e.Length; i++)
            Assert.True(Math.Abs(e[i] - actual[i]) <= tol * Math.Max(1, Math.Abs(e[i])), $"element {i}: {actual[i]} vs {e[i]}");
    }

    /// <summary>
    /// Row <c>2j + half</c> of each head in the file must be HF row <c>half·d/2 + j</c> of that head:
    /// llama.cpp rotates pairs (2j, 2j+1) where HF rotates (j, j + d/2). Indices computed here, one by one.
    /// </summary>
    static void AssertInterleaved(Tensor hf, double[] gguf, int heads, double tol)
    {
        var w = hf.to(ScalarType.Float64).contiguous();
        long rows = w.shape[0], cols = w.shape[1], d = rows / heads;
        var src = w.data<double>().ToArray();
        Assert.Equal(src.Length, gguf.Length);
        for (long h = 0; h < heads; h++)
            for (long j = 0; j < d / 2; j++)
                for (long half = 0; half < 2; half++)
                {
                    long from = h * d + half * (d / 2) + j, to = h * d + 2 * j + half;
                    for (long c = 0; c < cols; c++)
                    {
                        double e = src[from * cols + c], a = gguf[to * cols + c];
                        Assert.True(Math.Abs(e - a) <= tol * Math.Max(1, Math.Abs(e)), $"head {h} row {to} col {c}: {a} vs HF row {from} {e}");
                    }
                }
    }

    [Fact]
    public void Rope_permutation_matches_the_index_formula_and_inverts()
    {
        var w = torch.arange(6 * 8 * 3, ScalarType.Float64).reshape(6 * 8, 3);   // 6 heads of 8, 3 columns
        var p = GgufExport.PermuteForRope(w, 6);
        AssertInterleaved(w, p.data<double>().ToArray(), 6, 0);
        // The inverse (HF's own converter direction: reshape(heads, d/2, 2, ·).transpose(1, 2)) restores the rows.
        var back = p.reshape(6, 4, 2, 3).transpose(1, 2).reshape(48, 3);
        Assert.True(torch.eq(back, w).all().item<bool>());
        var bias = torch.arange(16, ScalarType.Float64);
        var pb = GgufExport.PermuteForRope(bias, 2).data<double>().ToArray();
        Assert.Equal(new double[] { 0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15 }, pb);
    }

    // ------------------------------------------------------------------ llama.cpp vs references

    [Fact]
    public void Reference_forward_reproduces_the_dense_float64_perplexity_and_logits()
    {
        using var scope = torch.NewDisposeScope();
        using var reference = LlamaReference.Load(Stories, Layers, HeadDim, 1e-5, 10000);
        var sw = Stopwatch.StartNew();
        double ppl = reference.Perplexity(EvalIds, SeqLen, Windows);
        _out.WriteLine($"reference forward: {sw.Elapsed.TotalSeconds:F1} s");
        _out.WriteLine($"float64 reference forward, dense, 40×512: {ppl:F6} (reference.json {DenseReference:F6})");
        Assert.True(Math.Abs(ppl / DenseReference - 1) < 1e-9, $"{ppl} vs {DenseReference}");
        var golden = JsonNode.Parse(File.ReadAllText(Path.Combine(Stories, "golden.json")))!;
        var ids = golden["input_ids"]![1]!.AsArray().Select(x => (long)x!).ToArray();
        var logits = reference.Logits(ids).data<double>().ToArray();
        var want = golden["logits"]![1]!.AsArray().SelectMany(r => r!.AsArray().Select(x => (double)x!)).ToArray();
        Assert.Equal(want.Length, logits.Length);
        double maxDiff = want.Zip(logits).Max(z => Math.Abs(z.First - z.Second));
        _out.WriteLine($"golden logits: max |Δ| {maxDiff:E2}, total {sw.Elapsed.TotalSeconds:F1} s");
        Assert.True(maxDiff < 1e-6, $"max |Δlogit| {maxDiff}");   // golden.json stores logits to ~8 significant digits
    }

    [Fact]
    public void LlamaCpp_runs_the_dense_export_at_the_reference_perplexity_F32_and_F16()
    {
        double reference = DenseReference;
        var greedyWant = JsonNode.Parse(File.ReadAllText(Path.Combine(Stories, "greedy-sample.json")))!["ids"]!.AsArray().Select(x => (int)x!).ToArray();
        // F32 is computed with F32 attention (the file in F32 throughout): 1e-5, well inside the brief's 0.1 %;
        // the per-layer pruned test also checks an F32 file under llama.cpp's defaults at 0.1 %.
        // F16 runs with llama.cpp's defaults (F16 K/V cache, flash attention), as its users run it: 0.5 %.
        foreach (var (dtype, f32Attention, tol) in new[] { (GgufDType.F32, true, 1e-5), (GgufDType.F16, false, 5e-3) })
        {
            string path = Path.Combine(_tmp, $"dense-{dtype}.gguf");
            GgufExport.Run(Stories, path, dtype);
            // Correctness runs on 1 thread: results do not depend on the thread count, and on this shared
            // 2-core machine ggml's spinning thread barrier slows 2 threads by up to 5× when other jobs run.
            using var rt = LlamaCppRuntime.Load(path, SeqLen, threads: 1, f32Attention: f32Attention);
            Assert.Equal("llama", rt.Metadata["general.architecture"]);
            var ppl = rt.Perplexity(EvalIds, SeqLen, Windows);
            Assert.Equal(Windows, ppl.Windows);
            Assert.Equal(Windows * (SeqLen - 1), ppl.Predictions);
            var greedy = rt.Speed([1], 1, greedyWant.Length - 1, repeats: 1);
            int agree = greedy.GreedyIds.Zip(greedyWant.Skip(1)).TakeWhile(z => z.First == z.Second).Count();
            LlamaCppSpeed speed;   // llama.cpp's defaults, 2 threads
            using (var rt2 = LlamaCppRuntime.Load(path, SeqLen, threads: 2)) speed = rt2.Speed(EvalIds, SeqLen - 64, 64);   // prefill + decode fit the 512-token context
            _out.WriteLine($"llama.cpp {dtype} dense, {(f32Attention ? "F32 attention" : "llama.cpp defaults")}: ppl {ppl.Perplexity:F6} vs float64 {reference:F6} (rel {ppl.Perplexity / reference - 1:+0.00e+0;-0.00e+0}), " +
                $"{ppl.TokensPerSecond:F0} tok/s in ppl (1 thread); defaults, 2 threads: prefill {speed.PrefillTokens} {speed.PrefillTokensPerSecond:F0} tok/s, decode {speed.DecodeMsPerToken:F3} ms/token; " +
                $"greedy from bos agrees for {agree}/{greedyWant.Length - 1} tokens");
            Assert.True(speed.PrefillTokensPerSecond > 0 && speed.DecodeMsPerToken > 0);
            Assert.True(Math.Abs(ppl.Perplexity / reference - 1) < tol, $"{dtype}: llama.cpp {ppl.Perplexity} vs reference {reference}");
            if (dtype == GgufDType.F32)
            {
                // Greedy decoding on the KV cache reproduces the author's sample token for token.
                Assert.Equal(greedyWant.Skip(1), greedy.GreedyIds);
                // llama.cpp's own SentencePiece tokenizer, fed the exported vocabulary, reproduces the golden ids.
                string text = File.ReadAllText(Path.Combine(Repo.Root, "eval", "data", "tinystories", "eval.txt"));
                int cut = text.IndexOf('\n', 3000);
                var ids = rt.Tokenize(text[..cut], addBos: true);
                Assert.Equal(EvalIds.Take(ids.Length), ids);
                Assert.True(ids.Length > 500);
            }
        }
    }

    /// <summary>
    /// A pruned stories260K: per layer, the K/V groups kept (a group = one K/V head and the two
    /// query heads that read it) and the number of MLP neurons removed.
    /// </summary>
    string BuildPruned(string name, int[][] keptGroups, int[] ffnRemoved, bool mlpBias, bool uniform, bool attentionBias = false)
    {
        string dir = Path.Combine(_tmp, name);
        var dense = DenseTensors();
        var gen = new torch.Generator(7);
        var tensors = new List<(string, Tensor)>();
        var ffn = new int[Layers];
        tensors.Add(("model.embed_tokens.weight", dense["model.embed_tokens.weight"]));
        tensors.Add(("model.norm.weight", dense["model.norm.weight"]));
        for (int i = 0; i < Layers; i++)
        {
            string p = $"model.layers.{i}.";
            var qRows = keptGroups[i].SelectMany(g => Enumerable.Range(2 * g * HeadDim, 2 * HeadDim)).Select(x => (long)x).ToArray();
            var kvRows = keptGroups[i].SelectMany(g => Enumerable.Range(g * HeadDim, HeadDim)).Select(x => (long)x).ToArray();
            var neurons = torch.randperm(DenseFfn, generator: gen).narrow(0, 0, DenseFfn - ffnRemoved[i]).sort().Values;
            ffn[i] = (int)neurons.shape[0];
            var qi = torch.tensor(qRows); var kvi = torch.tensor(kvRows);
            tensors.Add((p + "input_layernorm.weight", dense[p + "input_layernorm.weight"]));
            tensors.Add((p + "post_attention_layernorm.weight", dense[p + "post_attention_layernorm.weight"]));
            tensors.Add((p + "self_attn.q_proj.weight", dense[p + "self_attn.q_proj.weight"].index_select(0, qi)));
            tensors.Add((p + "self_attn.k_proj.weight", dense[p + "self_attn.k_proj.weight"].index_select(0, kvi)));
            tensors.Add((p + "self_attn.v_proj.weight", dense[p + "self_attn.v_proj.weight"].index_select(0, kvi)));
            tensors.Add((p + "self_attn.o_proj.weight", dense[p + "self_attn.o_proj.weight"].index_select(1, qi)));
            tensors.Add((p + "mlp.gate_proj.weight", dense[p + "mlp.gate_proj.weight"].index_select(0, neurons)));
            tensors.Add((p + "mlp.up_proj.weight", dense[p + "mlp.up_proj.weight"].index_select(0, neurons)));
            tensors.Add((p + "mlp.down_proj.weight", dense[p + "mlp.down_proj.weight"].index_select(1, neurons)));
            if (attentionBias)
            {
                // q/k biases must be permuted with their rows: a wrong order shows in perplexity at once.
                tensors.Add((p + "self_attn.q_proj.bias", torch.randn(qRows.Length, generator: gen)));
                tensors.Add((p + "self_attn.k_proj.bias", torch.randn(kvRows.Length, generator: gen)));
                tensors.Add((p + "self_attn.v_proj.bias", 0.05f * torch.randn(kvRows.Length, generator: gen)));
                tensors.Add((p + "self_attn.o_proj.bias", 0.05f * torch.randn(Hidden, generator: gen)));
            }
            if (mlpBias)
            {
                // What a bias-folding reconstruction leaves: small per-neuron and per-output offsets.
                tensors.Add((p + "mlp.gate_proj.bias", 0.05f * torch.randn(ffn[i], generator: gen)));
                tensors.Add((p + "mlp.up_proj.bias", 0.05f * torch.randn(ffn[i], generator: gen)));
                tensors.Add((p + "mlp.down_proj.bias", 0.05f * torch.randn(Hidden, generator: gen)));
            }
        }
        SafeTensorsWriter.WriteAll(dir, tensors);
        foreach (var f in new[] { "tokenizer.model", "tokenizer_config.json" }) File.Copy(Path.Combine(Stories, f), Path.Combine(dir, f));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(Stories, "config.json")))!.AsObject();
        var heads = keptGroups.Select(g => 2 * g.Length).ToArray();
        var kv = keptGroups.Select(g => g.Length).ToArray();
        cfg["pruned"] = true;
        cfg["intermediate_sizes"] = new JsonArray(ffn.Select(x => (JsonNode)x).ToArray());
        cfg["num_heads_per_layer"] = new JsonArray(heads.Select(x => (JsonNode)x).ToArray());
        cfg["num_key_value_heads_per_layer"] = new JsonArray(kv.Select(x => (JsonNode)x).ToArray());
        cfg["mlp_bias"] = mlpBias;
        cfg["attention_bias"] = attentionBias;
        if (uniform)
        {
            cfg["intermediate_size"] = ffn[0];
            cfg["num_attention_heads"] = heads[0];
            cfg["num_key_value_heads"] = kv[0];
        }
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        return dir;
    }

    void CheckPrunedAgainstReference(string dir, string arch, int[][] keptGroups, int windows, bool defaultsToo = false)
    {
        string path = Path.Combine(_tmp, Path.GetFileName(dir) + ".gguf");
        var res = GgufExport.Run(dir, path, GgufDType.F32);
        Assert.Equal(arch, res.Architecture);
        Assert.Equal(keptGroups.Select(g => 2 * g.Length), res.Layers.Select(l => l.Heads));
        Assert.Equal(keptGroups.Select(g => g.Length), res.Layers.Select(l => l.KvHeads));
        var g = GgufFile.Read(path);
        if (arch == "deci")
        {
            Assert.Equal(5u, g.ArrayType("deci.feed_forward_length"));   // int32 arrays, one entry per layer
            Assert.Equal(res.Layers.Select(l => l.FfnDim), g.Array<int>("deci.feed_forward_length"));
            Assert.Equal(res.Layers.Select(l => l.Heads), g.Array<int>("deci.attention.head_count"));
            Assert.Equal(res.Layers.Select(l => l.KvHeads), g.Array<int>("deci.attention.head_count_kv"));
        }
        else Assert.Equal((uint)res.Layers[0].Heads, g.Scalar<uint>("llama.attention.head_count"));
        Assert.Equal(8u, g.Scalar<uint>($"{arch}.attention.key_length"));
        for (int i = 0; i < Layers; i++)
            Assert.Equal(new ulong[] { Hidden, (ulong)(keptGroups[i].Length * HeadDim) }, g.Tensor($"blk.{i}.attn_k.weight").Ne);

        // llama.cpp with F32 attention (K/V cache F32, no flash attention) computes the F32 file in F32: 1e-5
        // on all windows. With its defaults (F16 K/V, flash attention; 3× slower here) 0.1 %, on the first 10.
        const int defaultWindows = 10;
        double refAll, refFirst = double.NaN;
        using (var scope = torch.NewDisposeScope())
        using (var r = LlamaReference.Load(dir, Layers, HeadDim, 1e-5, 10000))
        {
            refAll = r.Perplexity(EvalIds, SeqLen, windows);
            if (defaultsToo) refFirst = r.Perplexity(EvalIds, SeqLen, defaultWindows);
        }
        foreach (var (exact, tol) in defaultsToo ? new[] { (true, 1e-5), (false, 1e-3) } : new[] { (true, 1e-5) })
        {
            using var rt = LlamaCppRuntime.Load(path, SeqLen, threads: 1, f32Attention: exact);   // 1 thread: see the dense test
            Assert.Equal(arch, rt.Metadata["general.architecture"]);
            var ppl = rt.Perplexity(EvalIds, SeqLen, exact ? windows : defaultWindows);
            double reference = exact ? refAll : refFirst;
            var speed = rt.Speed(EvalIds, SeqLen - 16, 16);
            _out.WriteLine($"{Path.GetFileName(dir)} ({arch}, heads {string.Join(",", res.Layers.Select(l => l.Heads))}, ffn {string.Join(",", res.Layers.Select(l => l.FfnDim))}, {ppl.Windows}×{SeqLen}): " +
                $"llama.cpp F32 file, {(exact ? "F32 attention" : "llama.cpp defaults")}: ppl {ppl.Perplexity:F6} vs float64 forward {reference:F6} (rel {ppl.Perplexity / reference - 1:+0.00e+0;-0.00e+0}); " +
                $"dense reference {DenseReference:F5}; 1 thread: prefill {speed.PrefillTokens} {speed.PrefillTokensPerSecond:F0} tok/s, decode {speed.DecodeMsPerToken:F3} ms/token");
            Assert.True(Math.Abs(ppl.Perplexity / reference - 1) < tol, $"llama.cpp {ppl.Perplexity} vs float64 forward {reference} ({(exact ? "F32 attention" : "defaults")})");
        }
        Assert.True(refAll > DenseReference, "removing heads and neurons without reconstruction should cost perplexity");
    }

    [Fact]
    public void LlamaCpp_runs_a_per_layer_pruned_export_as_deci_at_the_float64_forward_perplexity()
    {
        int[][] groups = [[0, 1, 2, 3], [0, 1, 3], [1, 2], [0, 2, 3], [2]];
        string dir = BuildPruned("pruned-deci", groups, [10, 40, 0, 100, 25], mlpBias: true, uniform: false);
        CheckPrunedAgainstReference(dir, "deci", groups, Windows, defaultsToo: true);
    }

    [Fact]
    public void LlamaCpp_runs_a_uniformly_pruned_export_as_llama_with_fewer_heads_than_hidden_over_head_dim()
    {
        int[][] groups = [[0, 1, 3], [0, 2, 3], [1, 2, 3], [0, 1, 2], [0, 1, 3]];
        string dir = BuildPruned("pruned-uniform", groups, [22, 22, 22, 22, 22], mlpBias: false, uniform: true);
        CheckPrunedAgainstReference(dir, "llama", groups, 10);   // the second pruned case: fewer windows keep the suite short
    }

    [Fact]
    public void LlamaCpp_adds_every_attention_and_mlp_bias_with_q_k_biases_in_rope_order()
    {
        int[][] groups = [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]];
        string dir = BuildPruned("biased", groups, [0, 0, 0, 0, 0], mlpBias: true, uniform: true, attentionBias: true);
        CheckPrunedAgainstReference(dir, "llama", groups, 10);
        var res = GgufExport.Run(dir, Path.Combine(_tmp, "biased-again.gguf"), GgufDType.F16);
        Assert.Equal(new[] { "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj" }, res.Biases);
        var g = GgufFile.Read(res.Path);
        Assert.Equal(0u, g.Tensor("blk.0.attn_q.bias").Type);   // biases stay F32 in an F16 file
        Assert.Equal(new ulong[] { 32 }, g.Tensor("blk.0.attn_k.bias").Ne);
        using (var r = new CheckpointReader(dir))
            for (int i = 0; i < Layers; i++)
            {
                AssertInterleaved(r.Read($"model.layers.{i}.self_attn.q_proj.bias", ScalarType.Float32, CPU).unsqueeze(1), g.Values($"blk.{i}.attn_q.bias"), DenseHeads, 0);
                AssertInterleaved(r.Read($"model.layers.{i}.self_attn.k_proj.bias", ScalarType.Float32, CPU).unsqueeze(1), g.Values($"blk.{i}.attn_k.bias"), DenseKv, 0);
            }

        // Qwen2 always has q/k/v biases (and no o bias unless attention_bias says so).
        string qwen = Path.Combine(_tmp, "qwen2");
        Directory.CreateDirectory(qwen);
        var t = DenseTensors();
        for (int i = 0; i < Layers; i++)
            foreach (var (proj, n) in new[] { ("q_proj", 64), ("k_proj", 32), ("v_proj", 32) })
                t[$"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(n);
        SafeTensorsWriter.WriteAll(qwen, t.Select(kv => (kv.Key, kv.Value)));
        foreach (var f in new[] { "tokenizer.model", "tokenizer_config.json", "config.json" }) File.Copy(Path.Combine(Stories, f), Path.Combine(qwen, f));
        EditConfig(qwen, c => { c["model_type"] = "qwen2"; c.Remove("attention_bias"); c.Remove("mlp_bias"); });
        var q = GgufExport.Run(qwen, Path.Combine(_tmp, "qwen2.gguf"), GgufDType.F32);
        Assert.Equal("llama", q.Architecture);
        Assert.Equal(new[] { "k_proj", "q_proj", "v_proj" }, q.Biases);
    }

    // ------------------------------------------------------------------ refusals

    /// <summary>A copy of stories260K with some files changed, in its own directory.</summary>
    string Variant(string name, Action<string> change)
    {
        string dir = Path.Combine(_tmp, name);
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(Stories)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        change(dir);
        return dir;
    }

    static void EditConfig(string dir, Action<JsonObject> edit)
    {
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        edit(cfg);
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
    }

    void AssertRefused(string dir, string[] mustContain, GgufDType dtype = GgufDType.F32)
    {
        string outDir = Path.Combine(_tmp, "out-" + Path.GetFileName(dir));
        Directory.CreateDirectory(outDir);
        var e = Assert.Throws<LlmSnpException>(() => GgufExport.Run(dir, Path.Combine(outDir, "m.gguf"), dtype));
        _out.WriteLine("refused: " + e.Message);
        Assert.DoesNotContain('\n', e.Message);
        foreach (var s in mustContain) Assert.Contains(s, e.Message);
        Assert.Empty(Directory.GetFileSystemEntries(outDir));   // no output, no temporary file
    }

    [Fact]
    public void Bad_inputs_are_refused_in_one_line_naming_the_file_field_or_tensor_and_leave_nothing()
    {
        AssertRefused(Variant("no-tokenizer", d => File.Delete(Path.Combine(d, "tokenizer.model"))), ["tokenizer.model", "file not found"]);
        AssertRefused(Variant("bad-tokenizer", d => File.WriteAllBytes(Path.Combine(d, "tokenizer.model"), [0x0a, 0xff])), ["tokenizer.model", "not a SentencePiece"]);

        // A tensor whose shape disagrees with config.json.
        AssertRefused(Variant("wrong-shape", d =>
        {
            var t = DenseTensors();
            t["model.layers.3.mlp.up_proj.weight"] = t["model.layers.3.mlp.up_proj.weight"].narrow(0, 0, 150);
            File.Delete(Path.Combine(d, "model.safetensors"));
            SafeTensorsWriter.WriteAll(d, t.Select(kv => (kv.Key, kv.Value)));
        }), ["model.layers.3.mlp.up_proj.weight", "[150, 64]", "[172, 64]"]);

        // A layer pruned to 0 FFN neurons; a per-layer list of the wrong length.
        AssertRefused(Variant("zero-ffn", d => EditConfig(d, c =>
        {
            c["pruned"] = true;
            c["intermediate_sizes"] = new JsonArray(172, 172, 0, 172, 172);
        })), ["config.json", "intermediate_sizes'[2] is 0", "layer 2"]);
        AssertRefused(Variant("short-list", d => EditConfig(d, c => c["num_heads_per_layer"] = new JsonArray(8, 8))), ["num_heads_per_layer", "5 integers"]);

        // A uniform list that the stock field contradicts.
        AssertRefused(Variant("uniform-mismatch", d => EditConfig(d, c => c["intermediate_sizes"] = new JsonArray(160, 160, 160, 160, 160))), ["intermediate_size", "160"]);

        // q bias with heads removed: llama.cpp reads attn_q.bias at n_embd entries.
        AssertRefused(Variant("qbias-pruned", d => EditConfig(d, c =>
        {
            c["pruned"] = true;
            c["attention_bias"] = true;
            c["num_heads_per_layer"] = new JsonArray(8, 6, 8, 8, 8);
            c["num_key_value_heads_per_layer"] = new JsonArray(4, 3, 4, 4, 4);
        })), ["layer 1", "q_proj.bias", "attn_q.bias"]);

        // A bias the config does not declare (llama.cpp would add it, transformers would not).
        AssertRefused(Variant("undeclared-bias", d =>
        {
            var t = DenseTensors();
            t["model.layers.0.mlp.down_proj.bias"] = torch.zeros(64);
            File.Delete(Path.Combine(d, "model.safetensors"));
            SafeTensorsWriter.WriteAll(d, t.Select(kv => (kv.Key, kv.Value)));
        }), ["model.layers.0.mlp.down_proj.bias", "does not declare"]);

        // Values F16 cannot hold; what GGUF export does not handle.
        AssertRefused(Variant("f16-overflow", d =>
        {
            var t = DenseTensors();
            t["model.layers.1.mlp.gate_proj.weight"][0, 0] = 1e6f;
            File.Delete(Path.Combine(d, "model.safetensors"));
            SafeTensorsWriter.WriteAll(d, t.Select(kv => (kv.Key, kv.Value)));
        }), ["model.layers.1.mlp.gate_proj.weight", "float16's range"], GgufDType.F16);
        AssertRefused(Variant("rope-scaling", d => EditConfig(d, c => c["rope_scaling"] = new JsonObject { ["type"] = "linear", ["factor"] = 2.0 })), ["rope_scaling"]);
        AssertRefused(Variant("gpt2", d => EditConfig(d, c => c["model_type"] = "gpt2")), ["model_type", "gpt2"]);
        var bf16 = Assert.Throws<LlmSnpException>(() => GgufExport.ParseDType("bf16"));
        Assert.Contains("BF16", bf16.Message);
    }

    [Fact]
    public void Cli_export_gguf_prints_the_result_as_json_and_errors_as_one_line()
    {
        string cli = Path.Combine(AppContext.BaseDirectory, "LlmSnp.Cli.dll");
        (int, string, string) Cli(params string[] args)
        {
            var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            psi.ArgumentList.Add(cli);
            foreach (var a in args) psi.ArgumentList.Add(a);
            psi.Environment["MKL_NUM_THREADS"] = "1";
            psi.Environment["OMP_NUM_THREADS"] = "1";
            using var p = Process.Start(psi)!;
            var o = p.StandardOutput.ReadToEndAsync();
            var e = p.StandardError.ReadToEndAsync();
            Assert.True(p.WaitForExit(TimeSpan.FromSeconds(120)));
            return (p.ExitCode, o.Result, e.Result);
        }
        string gguf = Path.Combine(_tmp, "cli.gguf"), json = Path.Combine(_tmp, "cli.json");
        var (rc, stdout, stderr) = Cli("export", "gguf", "--model", Stories, "--out", gguf, "--dtype", "f16", "--json", json);
        Assert.True(rc == 0, stderr);
        var r = JsonNode.Parse(stdout)!;
        Assert.Equal("llama", (string)r["architecture"]!);
        Assert.Equal("F16", (string)r["dtype"]!);
        Assert.Equal(new FileInfo(gguf).Length, (long)r["bytes"]!);
        Assert.Equal(stdout.Trim(), File.ReadAllText(json).Trim());
        (rc, stdout, stderr) = Cli("export", "gguf", "--model", Stories, "--out", gguf, "--dtype", "bf16");
        Assert.Equal(1, rc);
        Assert.Equal("", stdout);
        Assert.StartsWith("error: --dtype bf16", stderr);
        Assert.Single(stderr.Trim().Split('\n'));
    }
}
