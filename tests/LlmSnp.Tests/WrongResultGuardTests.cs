using System.Buffers.Binary;
using System.Text.Json;
using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using Xunit.Abstractions;
using static LlmSnp.Tests.CliRuns;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// No wrong result with exit 0: a model whose weights or config make its forward non-finite is refused by every
/// command that computes with it (perplexity, generation, pruning), a value a cast cannot hold is refused by every
/// command that casts (convert, export gguf), and generation stops at the end-of-sequence token whichever tokenizer
/// file the model ships.
/// </summary>
[Collection("Console")]
public sealed class WrongResultGuardTests : IDisposable
{
    readonly ITestOutputHelper _out;
    readonly TempDir _tmp = new();
    public WrongResultGuardTests(ITestOutputHelper o) { _out = o; }
    public void Dispose() => _tmp.Dispose();

    string StoriesCopy(string name)
    {
        string dir = _tmp.Sub(name);
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(Path.Combine(Repo.Root, "models", "stories260k"))) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        return dir;
    }

    /// <summary>Overwrites the first float32 of a tensor in place, found through the safetensors header (read here, not by the library).</summary>
    static void SetFirstFloat(string dir, string tensor, float value)
    {
        string path = Path.Combine(dir, "model.safetensors");
        byte[] b = File.ReadAllBytes(path);
        long n = BinaryPrimitives.ReadInt64LittleEndian(b);
        using var header = JsonDocument.Parse(b.AsMemory(8, (int)n));
        var e = header.RootElement.GetProperty(tensor);
        Assert.Equal("F32", e.GetProperty("dtype").GetString());
        int at = 8 + (int)n + e.GetProperty("data_offsets")[0].GetInt32();
        BinaryPrimitives.WriteSingleLittleEndian(b.AsSpan(at), value);
        File.WriteAllBytes(path, b);
    }

    static void EditConfig(string dir, Action<JsonObject> edit)
    {
        string path = Path.Combine(dir, "config.json");
        var o = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        edit(o);
        File.WriteAllText(path, o.ToJsonString());
    }

    /// <summary>
    /// NaN and infinite weights (in an MLP, in attention, in the embedding), and RoPE settings that break the forward
    /// (a negative or zero scaling factor, a negative base, llama3 smoothing with high ≤ low), through eval ppl,
    /// generate and prune: each refuses with one line naming the model or its config.json, and prune writes nothing.
    /// </summary>
    [Fact]
    public void A_model_whose_forward_is_not_finite_is_refused_by_every_command_that_computes_with_it()
    {
        var broken = new (string Name, Action<string> Break, string Mention)[]
        {
            ("NaN in an MLP weight", d => SetFirstFloat(d, "model.layers.0.mlp.down_proj.weight", float.NaN), ""),
            ("+inf in an attention weight", d => SetFirstFloat(d, "model.layers.1.self_attn.q_proj.weight", float.PositiveInfinity), ""),
            ("-inf in the embedding", d => SetFirstFloat(d, "model.embed_tokens.weight", float.NegativeInfinity), ""),
            ("negative RoPE factor", d => EditConfig(d, c => c["rope_scaling"] = new JsonObject { ["rope_type"] = "linear", ["factor"] = -2.0 }), "factor"),
            ("zero RoPE factor", d => EditConfig(d, c => c["rope_scaling"] = new JsonObject { ["rope_type"] = "linear", ["factor"] = 0.0 }), "factor"),
            ("negative RoPE base", d => EditConfig(d, c => c["rope_theta"] = -10000.0), "rope_theta"),
            ("llama3 high ≤ low", d => EditConfig(d, c => c["rope_scaling"] = new JsonObject
            {
                ["rope_type"] = "llama3", ["factor"] = 8.0, ["low_freq_factor"] = 4.0, ["high_freq_factor"] = 1.0, ["original_max_position_embeddings"] = 256,
            }), "high_freq_factor"),
        };
        int runs = 0;
        foreach (var (name, breakIt, mention) in broken)
        {
            string model = StoriesCopy($"model-{runs}");
            breakIt(model);
            string dest = _tmp.Sub($"dest-{runs}");
            Directory.CreateDirectory(dest);
            var commands = new[]
            {
                new[] { "eval", "ppl", "--model", model, "--dataset", "tinystories", "--seqlen", "32", "--max-windows", "1" },
                new[] { "generate", "--model", model, "--prompt", "Once upon a time", "--max-new-tokens", "4" },
                new[] { "generate", "--model", model, "--prompt", "Once", "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "3" },
                new[] { "prune", "--model", model, "--out", Path.Combine(dest, "pruned"), "--calib", "tinystories", "--calib-samples", "4", "--calib-seqlen", "32", "--ratio", "0.2" },
            };
            foreach (var args in commands)
            {
                var r = Run(args);
                // The line names the model (its config.json for a config field); prune's names the layer whose weights or activations are not finite.
                string line = FailsWithOneLine(r, onlyLine: false, mention);
                Assert.True(line.Contains(model) || (args[0] == "prune" && mention == "" && line.Contains("layers.") && line.Contains("non-finite")),
                    $"{name}: the line should name the model or the layer\n{r}");
                _out.WriteLine($"{name,-28} {args[0]} {args[1]}: {line}");
                runs++;
            }
            Assert.Empty(Directory.GetFileSystemEntries(dest));
        }
        _out.WriteLine($"{runs} runs");
    }

    /// <summary>
    /// A finite value a target dtype cannot hold (1e5 > F16's 65504), and a NaN, through every command that casts:
    /// convert --to float16 and export gguf --dtype f16 both refuse naming the tensor, never a silent +inf with exit 0;
    /// the dtypes that hold it write it, to the target's rounding.
    /// </summary>
    [Fact]
    public void Every_cast_refuses_a_value_the_target_cannot_hold_and_writes_it_where_it_can()
    {
        const string tensor = "model.layers.0.mlp.up_proj.weight";
        string big = StoriesCopy("big");
        SetFirstFloat(big, tensor, 1e5f);
        string nan = StoriesCopy("nan");
        SetFirstFloat(nan, tensor, float.NaN);
        string dest = _tmp.Sub("dest");
        Directory.CreateDirectory(dest);
        var refused = new (string Model, string[] Args, string Mention)[]
        {
            (big, new[] { "convert", "--to", "float16", "--out", Path.Combine(dest, "a") }, "float16's range"),
            (big, new[] { "export", "gguf", "--dtype", "f16", "--out", Path.Combine(dest, "a.gguf") }, "float16's range"),
            (nan, new[] { "convert", "--to", "float16", "--out", Path.Combine(dest, "b") }, "NaN"),
            (nan, new[] { "convert", "--to", "bfloat16", "--out", Path.Combine(dest, "c") }, "NaN"),
            (nan, new[] { "export", "gguf", "--dtype", "f32", "--out", Path.Combine(dest, "b.gguf") }, "NaN"),
        };
        foreach (var (model, args, mention) in refused)
        {
            var full = args.Take(args[0] == "export" ? 2 : 1).Concat(new[] { "--model", model }).Concat(args.Skip(args[0] == "export" ? 2 : 1)).ToArray();
            _out.WriteLine(FailsWithOneLine(Run(full), onlyLine: true, model, tensor, mention));
        }
        Assert.Empty(Directory.GetFileSystemEntries(dest));

        // bfloat16 and float32 hold 1e5: written, to bfloat16's 8-bit significand (relative step 2^-8).
        foreach (var (to, tol) in new[] { ("bfloat16", 1.0 / 256), ("float32", 0.0) })
        {
            string outDir = Path.Combine(dest, to);
            Succeeds(Run(new[] { "convert", "--model", big, "--out", outDir, "--to", to }));
            using var reader = new CheckpointReader(outDir);
            using var t = reader.Read(tensor, ScalarType.Float64, CPU);
            double v = t.flatten()[0].item<double>();
            Assert.True(Math.Abs(v - 1e5) <= 1e5 * tol, $"--to {to}: first value {v}, expected 1e5");
        }
    }

    /// <summary>
    /// Greedy generation with each bundled language model (vocab.json + merges.txt, tokenizer.model, tokenizer.json only):
    /// the end-of-sequence id of the model's config is never generated without stopping there; the tokenizer.json-only
    /// model (as Llama 3 and Qwen ship) must reach it within 400 tokens, as its reference sample does.
    /// </summary>
    [Fact]
    public void Generation_stops_at_the_models_eos_whichever_tokenizer_file_it_ships()
    {
        foreach (var (name, mustStop) in new[] { ("opt-tiny-c4-v2", false), ("stories260k", false), ("tinystories-656k", true) })
        {
            string model = Path.Combine(Repo.Root, "models", name);
            int eos = JsonNode.Parse(File.ReadAllText(Path.Combine(model, "config.json")))!["eos_token_id"]!.GetValue<int>();
            string json = _tmp.Sub($"{name}.json");
            CliHarness.Succeeds(Run(new[] { "generate", "--model", model, "--prompt", "Once upon a time", "--max-new-tokens", mustStop ? "400" : "120", "--json", json }));
            var o = JsonNode.Parse(File.ReadAllText(json))!.AsObject();
            var ids = o["new_ids"]!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
            string stop = o["stop_reason"]!.GetValue<string>();
            _out.WriteLine($"{name}: {ids.Length} new tokens, stop {stop}, eos {eos}");
            int first = Array.IndexOf(ids, eos);
            if (stop == "eos") Assert.Equal(ids.Length - 1, first);
            else Assert.Equal(-1, first);
            if (mustStop) Assert.Equal("eos", stop);
        }
    }

    [Fact]
    public void Prune_with_nan_weights_fails_naming_the_layer_and_writes_nothing()
    {
        string model = (SmallOpt with
        {
            Edit = t => t["model.decoder.layers.1.fc1.weight"][3, 5].fill_(float.NaN),
        }).Write(_tmp.Sub("model"));
        string parent = _tmp.Sub("dest");
        Directory.CreateDirectory(parent);
        string outDir = Path.Combine(parent, "out");
        string line = FailsWithOneLine(Run(PruneArgs(model, outDir, "--ratio", "0.25")), onlyLine: false, "layers.1.");
        _out.WriteLine(line);
        Assert.Contains("non-finite", line);
        Assert.False(Directory.Exists(outDir));
        Assert.Empty(Siblings(parent, "out"));
    }
}
