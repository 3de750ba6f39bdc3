using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Evaluation;
using LlmSnp.Export;
using LlmSnp.Generation;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// Checkpoints as users download them: `pytorch_model.bin` written by PyTorch itself (zip, sharded, shared
/// storages, the pre-1.6 format) against the safetensors fixture and its float64 golden logits; tied heads
/// stored under either name; and the bad ones (hostile or truncated pickles, a missing shard, quantized
/// checkpoints): one line naming the file, exit 1, nothing written, nothing executed.
/// </summary>
[Collection("Console")]
public sealed class CheckpointFormatTests : IDisposable
{
    readonly TempDir _tmp = new();
    public void Dispose() => _tmp.Dispose();

    static string Bin(string name) => Repo.Fixture(Path.Combine("pytorch-bin", name));
    static string SafetensorsTwin => Repo.Fixture(Path.Combine("golden-opt", "opt-tiny-pre"));
    const string Pwned = "/tmp/llmsnp-pwned";

    static Dictionary<string, Tensor> AllTensors(string dir)
    {
        using var r = new CheckpointReader(dir);
        return r.Names.ToDictionary(n => n, n => r.Read(n, r.Entry(n).DType is var d ? SafeDTypes.ToTorch(d) : default, CPU));
    }

    static bool Same(Tensor a, Tensor b) => a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    // ------------------------------------------------------------------ pytorch_model.bin

    [Theory]
    [InlineData("opt-tiny-pre-bin", "pytorch")]
    [InlineData("opt-tiny-pre-bin-sharded", "pytorch")]
    [InlineData("opt-tiny-pre-bin-shared-storage", "pytorch")]
    [InlineData("opt-tiny-pre-bin-legacy", "pytorch")]
    public void Torch_saved_bin_holds_the_safetensors_tensors_bit_for_bit_and_gives_the_golden_logits(string fixture, string format)
    {
        string dir = Bin(fixture);
        using (var r = new CheckpointReader(dir)) Assert.Equal(format, r.Format);
        var want = AllTensors(SafetensorsTwin);
        var got = AllTensors(dir);
        // The shared-storage file stores lm_head too (one storage with the embedding): the same values.
        foreach (var (name, t) in got)
        {
            var reference = want.TryGetValue(name, out var w) ? w : want["model.decoder.embed_tokens.weight"];
            Assert.True(t.dtype == reference.dtype && t.shape.SequenceEqual(reference.shape) && Same(t, reference), name);
        }
        Assert.Empty(want.Keys.Except(got.Keys));

        var (ids, logits, _) = GoldenFile.Read(SafetensorsTwin);
        using var model = (OptModel)ModelFamilies.Open(dir, CPU, ScalarType.Float64);
        for (int s = 0; s < ids.Length; s++)
        {
            using var input = torch.tensor(ids[s], new long[] { 1, ids[s].Length });
            using var out64 = model.ForwardAllInMemory(input).squeeze(0);
            using var gold = torch.tensor(logits[s].SelectMany(x => x).ToArray(), new long[] { logits[s].Length, logits[s][0].Length }, ScalarType.Float64);
            double maxAbs = (out64 - gold).abs().max().item<double>();
            Assert.True(maxAbs < 1e-6, $"{fixture} seq {s}: max |Δlogit| {maxAbs:G3}");
        }
    }

    [Fact]
    public void Hostile_pickle_is_refused_naming_the_global_and_never_executed()
    {
        if (File.Exists(Pwned)) File.Delete(Pwned);
        string dir = Bin("hostile-pickle-exec");
        foreach (var cmd in new[] { new[] { "inspect", "--model", dir }, new[] { "eval", "ppl", "--model", dir, "--dataset", "tinystories", "--seqlen", "32", "--max-windows", "1" },
                     new[] { "convert", "--model", dir, "--out", _tmp.Sub("converted") } })
        {
            var line = CliHarness.FailsStrict(CliHarness.Run(cmd), onlyLine: true, completeLine: true, "pytorch_model.bin", "posix.system");
            Assert.Contains("nothing executed", line);
        }
        Assert.False(File.Exists(Pwned), "the pickle's os.system ran");
        Assert.False(Directory.Exists(_tmp.Sub("converted")));
    }

    /// <summary>Pickles that ask for code in every way the format allows; each is refused naming what it asked for.</summary>
    [Theory]
    [InlineData("cbuiltins\neval\n(X\u0005\u0000\u0000\u00001+1+1tR.", "builtins.eval")]
    [InlineData("\u0080\u0004\u008c\u0002os\u0094\u008c\u0006system\u0094\u0093\u0094.", "os.system")]
    [InlineData("(ctorch.nn.modules.linear\nLinear\n)R.", "torch.nn.modules.linear.Linear")]
    [InlineData("(ibuiltins\nlist\n.", "0x69")]
    [InlineData("\u0080\u0002ccollections\nOrderedDict\n)\u0081.", "0x81")]
    [InlineData("\u0080\u0002]}b.", "sets state")]
    [InlineData("\u0080\u0002}X\u0001\u0000\u0000\u0000aK\u0001s.", "not a tensor")]
    [InlineData("\u0080\u0002]K\u0001a.", "not a state dict")]
    [InlineData("\u0080\u0002}X\u0001\u0000\u0000\u0000a", "truncated")]
    public void Pickles_that_are_not_state_dicts_are_refused(string pickle, string mention)
    {
        var bytes = Encoding.Latin1.GetBytes(pickle);
        var e = Assert.Throws<LlmSnpException>(() =>
        {
            var (root, _) = TorchPickle.Load("x.pkl", bytes, 0, pid => TorchPickle.StorageId("x.pkl", pid, legacy: false));
            TorchPickle.StateDict("x.pkl", root);
        });
        Assert.Contains(mention, e.Message);
        Assert.StartsWith("x.pkl: ", e.Message);
    }

    /// <summary>A file cut anywhere (a download stopped short), in either format: one line naming it, never a crash.</summary>
    [Theory]
    [InlineData("opt-tiny-pre-bin")]
    [InlineData("opt-tiny-pre-bin-legacy")]
    public void Truncated_bin_is_refused_with_one_line(string fixture)
    {
        var full = File.ReadAllBytes(Path.Combine(Bin(fixture), PytorchBinFile.SingleFileName));
        foreach (var frac in new[] { 0.0, 0.001, 0.005, 0.01, 0.2, 0.5, 0.9, 0.999 })
        {
            string dir = _tmp.Sub($"{fixture}-{frac}");
            Directory.CreateDirectory(dir);
            File.Copy(Path.Combine(Bin(fixture), "config.json"), Path.Combine(dir, "config.json"));
            string file = Path.Combine(dir, PytorchBinFile.SingleFileName);
            File.WriteAllBytes(file, full[..(int)(full.Length * frac)]);
            var e = Assert.Throws<LlmSnpException>(() => { using var r = new CheckpointReader(dir); });
            Assert.Contains(file, e.Message);
            Assert.DoesNotContain('\n', e.Message);
        }
    }

    /// <summary>A data.pkl cut short inside an intact archive (rewritten with every entry stored, as torch.save does).</summary>
    [Fact]
    public void Truncated_pickle_inside_a_valid_zip_is_refused()
    {
        string dir = _tmp.Sub("cut-pkl");
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(Bin("opt-tiny-pre-bin"), "config.json"), Path.Combine(dir, "config.json"));
        using (var src = ZipFile.OpenRead(Path.Combine(Bin("opt-tiny-pre-bin"), PytorchBinFile.SingleFileName)))
        using (var dst = ZipFile.Open(Path.Combine(dir, PytorchBinFile.SingleFileName), ZipArchiveMode.Create))
            foreach (var entry in src.Entries)
            {
                using var ms = new MemoryStream();
                using (var s = entry.Open()) s.CopyTo(ms);
                var data = ms.ToArray();
                if (entry.FullName.EndsWith("data.pkl")) data = data[..(data.Length / 2)];
                using var o = dst.CreateEntry(entry.FullName, CompressionLevel.NoCompression).Open();
                o.Write(data);
            }
        var line = CliHarness.FailsStrict(CliHarness.Run(new[] { "inspect", "--model", dir }), onlyLine: true, completeLine: true, "data.pkl", "truncated");
        Assert.Contains(dir, line);
    }

    [Fact]
    public void Sharded_index_naming_a_missing_shard_is_refused_and_nothing_is_written()
    {
        string dir = _tmp.Sub("missing-shard");
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(Bin("opt-tiny-pre-bin-sharded")))
            if (!f.EndsWith("-00002-of-00002.bin")) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        string out1 = _tmp.Sub("out-missing"), before = string.Join(",", Directory.GetFiles(dir).Order());
        foreach (var cmd in new[] { new[] { "inspect", "--model", dir }, new[] { "convert", "--model", dir, "--out", out1 },
                     new[] { "prune", "--model", dir, "--out", out1, "--ratio", "0.25", "--calib", "wikitext2", "--calib-samples", "4", "--calib-seqlen", "16" } })
            CliHarness.FailsStrict(CliHarness.Run(cmd), onlyLine: false, completeLine: true, "pytorch_model.bin.index.json", "pytorch_model-00002-of-00002.bin");
        Assert.False(Directory.Exists(out1));
        Assert.Equal(before, string.Join(",", Directory.GetFiles(dir).Order()));
        Assert.DoesNotContain(Directory.GetFileSystemEntries(_tmp.Path), p => Path.GetFileName(p).StartsWith(".out-missing"));
    }

    [Fact]
    public void Convert_turns_a_bin_checkpoint_into_safetensors_bit_for_bit()
    {
        string outDir = _tmp.Sub("from-bin");
        var r = CliHarness.SucceedsJson(CliHarness.Run(new[] { "convert", "--model", Bin("opt-tiny-pre-bin-sharded"), "--out", outDir }));
        Assert.Equal("pytorch", (string?)r["from"]);
        Assert.Equal(new[] { "config.json", "model.safetensors" }, Directory.GetFiles(outDir).Select(Path.GetFileName).Order());
        Assert.Equal(File.ReadAllBytes(Path.Combine(SafetensorsTwin, "config.json")), File.ReadAllBytes(Path.Combine(outDir, "config.json")));
        var want = AllTensors(SafetensorsTwin);
        var got = AllTensors(outDir);
        Assert.Equal(want.Keys.Order(), got.Keys.Order());
        foreach (var (n, t) in want) Assert.True(Same(t, got[n]), n);
    }

    [Fact]
    public void Pruning_a_bin_checkpoint_writes_safetensors_that_reload()
    {
        string outDir = _tmp.Sub("pruned-from-bin"), model = _tmp.Sub("bin-with-tokenizer");
        string safetensors = new TinyOpt { Vocab = 50272, Layers = 3 }.Write(_tmp.Sub("st"));
        LlmSnp.Benchmarks.PytorchBinWriter.Convert(safetensors, model);
        var want = AllTensors(safetensors);
        var got = AllTensors(model);
        Assert.Equal(want.Keys.Order(), got.Keys.Order());
        foreach (var (n, t) in want) Assert.True(Same(t, got[n]), n);
        CliHarness.SucceedsJson(CliHarness.Run(new[] { "prune", "--model", model, "--out", outDir, "--ratio", "0.25",
            "--calib", "wikitext2", "--calib-samples", "4", "--calib-seqlen", "16" }));
        Assert.True(File.Exists(Path.Combine(outDir, SafeTensorsWriter.SingleFileName)));
        Assert.Empty(Directory.GetFiles(outDir, "*.bin"));
        using var m = ModelFamilies.OpenLanguageModel(outDir);
        Assert.True(m.BlockCount == 3);
    }

    // ------------------------------------------------------------------ tied heads

    /// <summary>A safetensors file with the given metadata, written the reference way (header length, JSON, data).</summary>
    static void WriteSafetensors(string path, IEnumerable<(string Name, Tensor T)> tensors, Dictionary<string, string> metadata)
    {
        var header = new JsonObject { ["__metadata__"] = new JsonObject(metadata.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))) };
        using var data = new MemoryStream();
        foreach (var (name, t) in tensors)
        {
            using var c = t.contiguous();
            long begin = data.Length;
            data.Write(c.bytes);
            header[name] = new JsonObject { ["dtype"] = "F32", ["shape"] = new JsonArray(c.shape.Select(x => (JsonNode)x).ToArray()), ["data_offsets"] = new JsonArray(begin, data.Length) };
        }
        var h = Encoding.UTF8.GetBytes(header.ToJsonString());
        using var f = File.Create(path);
        Span<byte> len = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)h.Length);
        f.Write(len);
        f.Write(h);
        data.Position = 0;
        data.CopyTo(f);
    }

    /// <summary>Rewrites a tied checkpoint with its tied matrix stored as <paramref name="variant"/> says.</summary>
    static void Restore(string dir, string embedName, string variant)
    {
        var t = AllTensors(dir);
        var embed = t[embedName];
        t.Remove(embedName);
        var meta = new Dictionary<string, string> { ["format"] = "pt" };
        switch (variant)
        {
            case "embed-only": t[embedName] = embed; break;
            case "head-only-alias": t["lm_head.weight"] = embed; meta[embedName] = "lm_head.weight"; break;
            case "head-only": t["lm_head.weight"] = embed; break;
            case "both-equal": t[embedName] = embed; t["lm_head.weight"] = embed.clone(); break;
            case "both-different": t[embedName] = embed; t["lm_head.weight"] = embed * 0.5 + 0.01; break;
        }
        File.Delete(Path.Combine(dir, "model.safetensors"));
        WriteSafetensors(Path.Combine(dir, "model.safetensors"), t.Select(kv => (kv.Key, kv.Value)), meta);
    }

    static Tensor Logits(ILanguageModel m, long[] ids)
    {
        using var input = torch.tensor(ids, new long[] { 1, ids.Length });
        return LlamaTests.Forward(m, input);
    }

    [Theory]
    [InlineData("llama", "head-only-alias")]
    [InlineData("llama", "head-only")]
    [InlineData("llama", "both-equal")]
    [InlineData("llama", "both-different")]
    [InlineData("opt", "head-only-alias")]
    [InlineData("opt", "head-only")]
    [InlineData("opt", "both-equal")]
    [InlineData("opt", "both-different")]
    public void Tied_head_stored_under_either_name_loads_as_transformers_loads_it(string family, string variant)
    {
        // Vocabularies of real tokenizers, so the untied variant can be pruned with calibration text.
        string Write(string d)
        {
            if (family == "opt") return new TinyOpt { Tied = true, Vocab = 50272 }.Write(d);
            new TinyLlama { Tied = true, Vocab = 512 }.Write(d);
            File.Copy(Path.Combine(Repo.Root, "models", "stories260k", "tokenizer.model"), Path.Combine(d, "tokenizer.model"));
            return d;
        }
        string embedName = family == "llama" ? "model.embed_tokens.weight" : "model.decoder.embed_tokens.weight";
        string baseline = Write(_tmp.Sub(family + "-embed-only")), dir = Write(_tmp.Sub($"{family}-{variant}"));
        Restore(dir, embedName, variant);
        long[] ids = { 1, 5, 9, 33, 60, 2, 17 };
        using var reference = ModelFamilies.OpenLanguageModel(baseline, CPU, ScalarType.Float64);
        using var model = ModelFamilies.OpenLanguageModel(dir, CPU, ScalarType.Float64);
        Assert.Empty(model.UnusedTensors);
        using var got = Logits(model, ids);
        if (variant != "both-different")
        {
            using var want = Logits(reference, ids);
            Assert.True(Same(got, want), $"{variant}: logits differ from the embed-only checkpoint");
            Assert.Equal(reference.ParameterCount(), model.ParameterCount());
            return;
        }
        // Distinct head: untied, as transformers loads it — the head's own logits, its parameters counted, and
        // a pruned copy says tie_word_embeddings false so stock loaders keep the head.
        Assert.Equal(reference.ParameterCount() + model.VocabSize * 32L, model.ParameterCount());
        using (var hidden = torch.randn(1, 3, 32, ScalarType.Float64))
        using (var headOut = model.Head(hidden))
        using (var refOut = reference.Head(hidden))
            Assert.False(headOut.allclose(refOut));
        string pruned = _tmp.Sub($"{family}-{variant}-pruned");
        CliHarness.SucceedsJson(CliHarness.Run(new[] { "prune", "--model", dir, "--out", pruned, "--ratio", "0.25", "--calib", "wikitext2", "--calib-samples", "4", "--calib-seqlen", "16" }));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(pruned, "config.json")))!;
        Assert.False((bool)cfg["tie_word_embeddings"]!);
        using var reloaded = AllTensorsDisposable(pruned);
        Assert.True(reloaded.Map.ContainsKey("lm_head.weight") && reloaded.Map.ContainsKey(embedName));
    }

    sealed record TensorMap(Dictionary<string, Tensor> Map) : IDisposable { public void Dispose() { foreach (var t in Map.Values) t.Dispose(); } }
    static TensorMap AllTensorsDisposable(string dir) => new(AllTensors(dir));

    [Fact]
    public void Untied_config_without_its_head_or_embedding_is_refused_with_one_line()
    {
        string noHead = new TinyLlama { Tied = true, EditConfig = c => c["tie_word_embeddings"] = false }.Write(_tmp.Sub("no-head"));
        var e = Assert.Throws<LlmSnpException>(() => ModelFamilies.Open(noHead));
        Assert.Contains("lm_head.weight", e.Message);
        string headOnly = new TinyLlama { Tied = true }.Write(_tmp.Sub("untied-head-only"));
        Restore(headOnly, "model.embed_tokens.weight", "head-only");
        File.WriteAllText(Path.Combine(headOnly, "config.json"), File.ReadAllText(Path.Combine(headOnly, "config.json")).Replace("\"tie_word_embeddings\":true", "\"tie_word_embeddings\":false"));
        e = Assert.Throws<LlmSnpException>(() => ModelFamilies.Open(headOnly));
        Assert.Contains("model.embed_tokens.weight", e.Message);
    }

    [Fact]
    public void Gguf_export_reads_a_head_only_tied_checkpoint()
    {
        string dir = new TinyLlama { Tied = true, Vocab = 512 }.Write(_tmp.Sub("gguf-head-only"));
        new TinyLlama { Tied = true, Vocab = 512 }.Write(_tmp.Sub("gguf-embed-only"));
        foreach (var d in new[] { dir, _tmp.Sub("gguf-embed-only") })
            File.Copy(Path.Combine(Repo.Root, "models", "stories260k", "tokenizer.model"), Path.Combine(d, "tokenizer.model"));
        Restore(dir, "model.embed_tokens.weight", "head-only-alias");
        GgufExport.Run(dir, _tmp.Sub("a.gguf"), GgufDType.F32);
        GgufExport.Run(_tmp.Sub("gguf-embed-only"), _tmp.Sub("b.gguf"), GgufDType.F32);
        // The same tensors and metadata; only general.name (the directory's name) differs.
        Assert.Equal(new FileInfo(_tmp.Sub("b.gguf")).Length, new FileInfo(_tmp.Sub("a.gguf")).Length);
    }

    // ------------------------------------------------------------------ quantized checkpoints

    public static TheoryData<string, string> QuantizationConfigs => new()
    {
        { """{"quant_method": "gptq", "bits": 4, "group_size": 128}""", "GPTQ, 4 bits" },
        { """{"quant_method": "awq", "bits": 4, "version": "gemm"}""", "AWQ, 4 bits, version gemm" },
        { """{"quant_method": "bitsandbytes", "load_in_8bit": true}""", "bitsandbytes, int8" },
        { """{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}""", "bitsandbytes, 4-bit nf4" },
        { """{"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}""", "FP8" },
        { """{"quant_method": "compressed-tensors", "format": "pack-quantized"}""", "compressed-tensors, format pack-quantized" },
    };

    [Theory]
    [MemberData(nameof(QuantizationConfigs))]
    public void Quantized_config_is_refused_naming_the_quantization(string quantization, string named)
    {
        string dir = new TinyLlama().Write(_tmp.Sub("q"));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        cfg["quantization_config"] = JsonNode.Parse(quantization);
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        foreach (Action open in new Action[] { () => ModelFamilies.Open(dir).Dispose(), () => new CheckpointReader(dir).Dispose() })
        {
            var e = Assert.Throws<LlmSnpException>(open);
            Assert.Contains($"({named})", e.Message);
            Assert.Contains("quantization_config", e.Message);
        }
    }

    /// <summary>Every command that opens a checkpoint refuses a quantized one, writing nothing.</summary>
    [Fact]
    public void Every_command_refuses_a_quantized_checkpoint_and_writes_nothing()
    {
        string dir = new TinyLlama().Write(_tmp.Sub("gptq"));
        TinyOpt.CopyTokenizer(dir);
        File.Copy(Path.Combine(Repo.Root, "models", "stories260k", "tokenizer.model"), Path.Combine(dir, "tokenizer.model"));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        cfg["quantization_config"] = new JsonObject { ["quant_method"] = "gptq", ["bits"] = 4 };
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString());
        string o = _tmp.Sub("out");
        foreach (var cmd in new[]
        {
            new[] { "inspect", "--model", dir, "--json", o + ".json" },
            new[] { "eval", "ppl", "--model", dir, "--dataset", "wikitext2", "--seqlen", "16", "--max-windows", "1", "--json", o + ".json" },
            new[] { "prune", "--model", dir, "--out", o, "--ratio", "0.25", "--calib", "wikitext2", "--calib-samples", "4", "--calib-seqlen", "16" },
            new[] { "export", "gguf", "--model", dir, "--out", o + ".gguf" },
            new[] { "convert", "--model", dir, "--out", o },
            new[] { "generate", "--model", dir, "--prompt", "Hello", "--max-new-tokens", "2" },
        })
            CliHarness.FailsStrict(CliHarness.Run(cmd), onlyLine: true, completeLine: true, "GPTQ", "quantization_config");
        Assert.Equal(new[] { "gptq" }, Directory.GetFileSystemEntries(_tmp.Path).Select(Path.GetFileName));
    }

    /// <summary>bitsandbytes int8 saved without its quantization_config: the scales give it away; int8 weights alone too.</summary>
    [Fact]
    public void Int8_tensors_without_a_quantization_config_are_refused()
    {
        string scb = new TinyLlama
        {
            Edit = t =>
            {
                var w = t["model.layers.0.mlp.up_proj.weight"];
                t["model.layers.0.mlp.up_proj.weight"] = (w * 127).round().to(ScalarType.Int8);
                t["model.layers.0.mlp.up_proj.SCB"] = torch.ones(w.shape[0]);
            },
        }.Write(_tmp.Sub("bnb8"));
        var e = Assert.Throws<LlmSnpException>(() => ModelFamilies.Open(scb));
        Assert.Contains("model.layers.0.mlp.up_proj.SCB", e.Message);
        Assert.Contains("bitsandbytes int8", e.Message);

        string codes = new TinyLlama { Edit = t => t["model.layers.1.mlp.down_proj.weight"] = (t["model.layers.1.mlp.down_proj.weight"] * 127).round().to(ScalarType.Int8) }.Write(_tmp.Sub("i8"));
        e = Assert.Throws<LlmSnpException>(() => ModelFamilies.Open(codes));
        Assert.Contains("model.layers.1.mlp.down_proj.weight", e.Message);
        Assert.Contains("I8", e.Message);
    }

    // ------------------------------------------------------------------ TinyStories-656K as its author saved it

    static string TinyStories656k => Path.Combine(Repo.Root, "models", "tinystories-656k");

    [Fact]
    public void TinyStories_656k_loads_as_saved_and_matches_its_float64_reference()
    {
        using (var st = SafeTensorsFile.Open(Path.Combine(TinyStories656k, "model.safetensors")))
        {
            Assert.False(st.Tensors.ContainsKey("model.embed_tokens.weight"));   // left as saved: lm_head only, with the alias
            Assert.Equal("lm_head.weight", st.Metadata["model.embed_tokens.weight"]);
        }
        var reference = JsonNode.Parse(File.ReadAllText(Path.Combine(TinyStories656k, "reference.json")))!;
        using var model = ModelFamilies.OpenLanguageModel(TinyStories656k, CPU, ScalarType.Float64);
        var tok = model.Tokenizer();
        var ids = tok.Encode(TextSources.EvaluationText(TextSources.TinyStories));
        Assert.Equal(81_980, ids.Length);
        var all = Perplexity.Evaluate(model, ids, 512, null, "tinystories");
        Assert.Equal(160, all.Windows);
        // The reference's 30.12309 to its five decimals (1.1e-7 relative).
        Assert.Equal(30.12309, Math.Round(all.Perplexity, 5));
        Assert.Equal((double)reference["seqlen_512_all_160_windows"]!, all.Perplexity, 2e-7 * all.Perplexity);
        var first = Perplexity.Evaluate(model, ids, 512, 20, "tinystories");
        Assert.Equal(32.76034, Math.Round(first.Perplexity, 5));
        Assert.Equal((double)reference["seqlen_512_first_20_windows"]!, first.Perplexity, 2e-7 * first.Perplexity);
    }

    [Fact]
    public void TinyStories_656k_greedy_from_bos_reproduces_the_reference_sample_and_tokenizer_json_stops_at_eos()
    {
        var sample = JsonNode.Parse(File.ReadAllText(Path.Combine(TinyStories656k, "greedy-sample.json")))!;
        var want = sample["ids"]!.AsArray().Select(x => (int)x!).ToArray();
        using var model = ModelFamilies.OpenLanguageModel(TinyStories656k, CPU, ScalarType.Float64);
        var tok = model.Tokenizer();
        Assert.Equal(new[] { 2 }, tok.EosIds);   // tokenizer.json has no eos: generation_config.json names it
        var gen = TextGeneration.GenerateUntil(model, new[] { want[0] }, new GenerationOptions { MaxNewTokens = 400, Temperature = 0 }, tok.EosIds);
        Assert.Equal(want[1..], gen.NewIds.Take(want.Length - 1));
        Assert.Equal(StopReasons.Eos, gen.StopReason);
        Assert.Equal(2, gen.NewIds[^1]);
    }
}
