using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Evaluation;
using LlmSnp.Export;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// GGUF export of mixtures, checked in llama.cpp itself (LLamaSharp 0.30.0): Mixtral as arch `llama` with experts,
/// Qwen3-MoE as `qwen3moe`, dense and with experts removed and pruned inside; the stacked expert tensors parsed back
/// against the per-expert ones; what llama.cpp would compute differently refused in one line.
/// </summary>
public sealed class MixtureGgufTests : IDisposable
{
    readonly TempDir _tmp = new();

    public void Dispose() => _tmp.Dispose();

    /// <summary>A fixture copy with the stories260K SentencePiece tokenizer (the same 512-token vocabulary).</summary>
    string WithTokenizer(string source, string name)
    {
        string dir = _tmp.Sub(name);
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(source)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        File.Copy(Path.Combine(Repo.Root, "models", "stories260k", "tokenizer.model"), Path.Combine(dir, "tokenizer.model"), overwrite: true);
        return dir;
    }

    /// <summary>The qwen3_moe fixture without its dense layer 1 (llama.cpp's qwen3moe has experts in every layer): layers 0 and 2.</summary>
    string AllSparseQwen()
    {
        string edited = MixtureTests.Edited(_tmp, "qwen3_moe", c => { c["num_hidden_layers"] = 2; c["mlp_only_layers"] = new JsonArray(); }, w =>
        {
            foreach (var k in w.Keys.Where(k => k.StartsWith("model.layers.1.")).ToList()) { w[k].Dispose(); w.Remove(k); }
            foreach (var k in w.Keys.Where(k => k.StartsWith("model.layers.2.")).ToList()) { w["model.layers.1." + k["model.layers.2.".Length..]] = w[k]; w.Remove(k); }
        });
        return WithTokenizer(edited, "qwen3moe-sparse");
    }

    string Source(string which) => which == "mixtral" ? WithTokenizer(MixtureTests.Fixture("mixtral"), "mixtral") : AllSparseQwen();

    static readonly long[] Ids = GoldenFile.Read(MixtureTests.Fixture("mixtral")).Ids[0];

    /// <summary>llama.cpp's logits of the GGUF against LlmSnp's float64 forward of the checkpoint: within 1e-4 of the largest logit (F32 file, F32 attention).</summary>
    static void AssertLlamaCppComputesTheCheckpoint(string dir, string gguf)
    {
        using (var reference = new MoeReference(dir))
        {
            double margin = reference.RoutingMargin(Ids);
            Assert.True(margin > 1e-4, $"the routing margin {margin:G3} is too small for float32 to choose the same experts: pick other ids");
        }
        using var model = ModelFamilies.OpenLanguageModel(dir, CPU, ScalarType.Float64);
        using var want = LlamaTests.Forward(model, torch.tensor(Ids, new long[] { 1, Ids.Length })).squeeze(0);
        using var rt = LlamaCppRuntime.Load(gguf, 64, threads: 1, f32Attention: true);
        var got = rt.Logits(Ids.Select(x => (int)x).ToArray());
        using var cpp = torch.tensor(got.SelectMany(r => r.Select(x => (double)x)).ToArray(), new long[] { got.Length, got[0].Length });
        double scale = want.abs().max().item<double>(), diff = (cpp - want).abs().max().item<double>();
        Assert.True(diff < 1e-4 * scale, $"{gguf}: llama.cpp vs LlmSnp max |Δlogit| = {diff:G3} (largest logit {scale:G3})");
    }

    [Theory]
    [InlineData("mixtral", "llama", 4, 96)]
    [InlineData("qwen3_moe", "qwen3moe", 8, 48)]
    public void Dense_exports_stack_the_experts_and_run_in_llama_cpp(string which, string arch, int experts, int width)
    {
        string dir = Source(which);
        string path = _tmp.Sub(which + ".gguf");
        var res = GgufExport.Run(dir, path, GgufDType.F32);
        Assert.Equal(arch, res.Architecture);
        var g = GgufFile.Read(path);
        Assert.Equal((uint)experts, g.Scalar<uint>($"{arch}.expert_count"));
        Assert.Equal(2u, g.Scalar<uint>($"{arch}.expert_used_count"));
        Assert.Equal((uint)width, g.Scalar<uint>(arch == "llama" ? "llama.feed_forward_length" : "qwen3moe.expert_feed_forward_length"));
        Assert.Equal(new ulong[] { 64, (ulong)width, (ulong)experts }, g.Tensor("blk.1.ffn_gate_exps.weight").Ne);
        Assert.Equal(new ulong[] { (ulong)width, 64, (ulong)experts }, g.Tensor("blk.1.ffn_down_exps.weight").Ne);
        Assert.Equal(new ulong[] { 64, (ulong)experts }, g.Tensor("blk.1.ffn_gate_inp.weight").Ne);
        // Expert e's slice of the stacked tensor is its stored tensor.
        var names = which == "mixtral" ? ("block_sparse_moe.experts", "w1", "w3", "w2") : ("mlp.experts", "gate_proj", "up_proj", "down_proj");
        using (var r = new CheckpointReader(dir))
            foreach (var (linear, gguf) in new[] { (names.Item2, "ffn_gate_exps"), (names.Item3, "ffn_up_exps"), (names.Item4, "ffn_down_exps") })
            {
                var stacked = g.Values($"blk.1.{gguf}.weight");
                long each = stacked.Length / experts;
                for (int e = 0; e < experts; e++)
                {
                    var want = r.Read($"model.layers.1.{names.Item1}.{e}.{linear}.weight", ScalarType.Float64, CPU).reshape(-1).data<double>().ToArray();
                    Assert.Equal(want, stacked.Skip((int)(e * each)).Take((int)each).ToArray());
                }
            }
        if (which == "qwen3_moe") Assert.Equal(new ulong[] { 24 }, g.Tensor("blk.0.attn_q_norm.weight").Ne);
        AssertLlamaCppComputesTheCheckpoint(dir, path);
    }

    /// <summary>Experts removed and pruned inside (--uniform): the GGUF has the reduced expert count and width and llama.cpp computes the pruned checkpoint.</summary>
    [Theory]
    [InlineData("mixtral", "llama", 3)]
    [InlineData("qwen3_moe", "qwen3moe", 5)]
    public void Pruned_exports_have_the_reduced_expert_count_and_run_in_llama_cpp(string which, string arch, int keep)
    {
        string src = Source(which), outDir = _tmp.Sub(which + "-pruned");
        PruneJob.Run(new PruneJobOptions
        {
            ModelDir = src, OutDir = outDir, CalibSource = LlmSnp.Data.TextSources.TinyStories, CalibSamples = 8, CalibSeqLen = 64,
            Prune = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.25, UniformWidths = true, WidthMultiple = 8, Experts = new ExpertOptions { Keep = keep } },
        }, null);
        string path = _tmp.Sub(which + "-pruned.gguf");
        var res = GgufExport.Run(outDir, path, GgufDType.F32);
        var g = GgufFile.Read(path);
        Assert.Equal((uint)keep, g.Scalar<uint>($"{arch}.expert_count"));
        int width = res.Layers[0].FfnDim;
        Assert.Equal(0, width % 8);
        Assert.Equal(new ulong[] { 64, (ulong)width, (ulong)keep }, g.Tensor("blk.0.ffn_up_exps.weight").Ne);
        AssertLlamaCppComputesTheCheckpoint(outDir, path);
    }

    [Fact]
    public void What_llama_cpp_would_compute_differently_is_refused_in_one_line()
    {
        void Refused(string dir, params string[] mentions)
        {
            string path = _tmp.Sub("refused.gguf");
            var e = Assert.Throws<LlmSnpException>(() => GgufExport.Run(dir, path, GgufDType.F32));
            Assert.DoesNotContain('\n', e.Message);
            foreach (var m in mentions) Assert.Contains(m, e.Message);
            Assert.False(File.Exists(path));
            Assert.Empty(Directory.GetFiles(_tmp.Path, "*refused*"));
        }
        Refused(WithTokenizer(MixtureTests.Fixture("qwen3_moe"), "qwen-dense-layer"), "mlp_only_layers", "layer 1 dense");
        string sparse = AllSparseQwen();
        Refused(WithTokenizer(MixtureTests.Edited(_tmp, "qwen3_moe", c => { c["mlp_only_layers"] = new JsonArray(); c["num_hidden_layers"] = 1; c["norm_topk_prob"] = false; },
            w => { foreach (var k in w.Keys.Where(k => !k.StartsWith("model.layers.0.") && k.StartsWith("model.layers.")).ToList()) w.Remove(k); }), "qwen-nonorm"), "norm_topk_prob", "renormalises");
        // Per-expert widths (a variance prune of the experts).
        string outDir = _tmp.Sub("variance");
        PruneJob.Run(new PruneJobOptions
        {
            ModelDir = sparse, OutDir = outDir, CalibSource = LlmSnp.Data.TextSources.TinyStories, CalibSamples = 4, CalibSeqLen = 64,
            Prune = new PruneOptions { Policy = RatioPolicyKind.Variance, Amount = 0.9, Targets = new HashSet<NodeKind> { NodeKind.Expert } },
        }, null);
        Refused(outDir, "expert_intermediate_sizes", "--uniform");
        Refused(WithTokenizer(MixtureTests.Edited(_tmp, "mixtral", c => c["sliding_window"] = 8), "mixtral-window"), "sliding_window");
    }
}
