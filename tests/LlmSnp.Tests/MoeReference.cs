using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Tests;

/// <summary>
/// An independent float64 forward of a Mixtral / Qwen3-MoE checkpoint for the tests (HF modeling_mixtral /
/// modeling_qwen3_moe semantics), written token by token where LlmSnp groups tokens by expert: per token the router's
/// softmax in float64, the top-k found by sorting the probabilities in C#, divided by their sum where the config says,
/// and Σ w · down(silu(gate x) ⊙ up x) over the chosen experts. Experts per layer and every width come from the
/// tensor shapes, so it also runs pruned checkpoints (fewer experts, narrower experts, fewer heads).
/// </summary>
sealed class MoeReference : IDisposable
{
    readonly Dictionary<string, Tensor> _w;
    readonly string _router, _experts, _gate, _up, _down;
    readonly int _layers, _headDim, _topK;
    readonly double _eps, _theta;
    readonly bool _norm, _qkNorm;

    public MoeReference(string dir)
    {
        using var r = new CheckpointReader(dir);
        _w = r.Names.ToDictionary(n => n, n => r.Read(n, ScalarType.Float64, CPU).DetachFromDisposeScope());
        var c = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        bool mixtral = (string)c["model_type"]! == "mixtral";
        (_router, _experts, _gate, _up, _down) = mixtral
            ? ("block_sparse_moe.gate", "block_sparse_moe.experts", "w1", "w3", "w2")
            : ("mlp.gate", "mlp.experts", "gate_proj", "up_proj", "down_proj");
        _layers = (int)c["num_hidden_layers"]!;
        _headDim = c["head_dim"] is JsonNode hd ? (int)hd : (int)c["hidden_size"]! / (int)c["num_attention_heads"]!;
        _topK = (int)c["num_experts_per_tok"]!;
        _eps = (double)c["rms_norm_eps"]!;
        _theta = (double)c["rope_theta"]!;
        _norm = mixtral || (c["norm_topk_prob"] is JsonNode n && (bool)n);
        _qkNorm = !mixtral;
    }

    Tensor W(string name) => _w[name];
    Tensor? Opt(string name) => _w.TryGetValue(name, out var t) ? t : null;
    static string L(int i) => $"model.layers.{i}.";

    Tensor Rms(Tensor x, Tensor w) => x * torch.rsqrt(x.pow(2).mean([-1], keepdim: true) + _eps) * w;

    static Tensor Linear(Tensor x, Tensor w, Tensor? b = null) { var y = x.matmul(w.t()); return b is null ? y : y + b; }

    public bool Sparse(int layer) => _w.ContainsKey(L(layer) + _router + ".weight");

    public int Experts(int layer) => (int)W(L(layer) + _router + ".weight").shape[0];

    public Tensor Embed(long[] ids) => W("model.embed_tokens.weight").index_select(0, torch.tensor(ids));

    /// <summary>The stream after layer i's attention: h + o_proj(attn(input_layernorm(h))), for h [T, hidden] from position 0.</summary>
    public Tensor AfterAttention(int i, Tensor h)
    {
        string p = L(i);
        long t = h.shape[0], d = _headDim;
        var x = Rms(h, W(p + "input_layernorm.weight"));
        Tensor Heads(string proj, string? norm)
        {
            var y = Linear(x, W(p + $"self_attn.{proj}.weight"), Opt(p + $"self_attn.{proj}.bias")).reshape(t, -1, d);
            if (norm != null) y = Rms(y, W(p + $"self_attn.{norm}.weight"));
            return y.transpose(0, 1);   // [heads, T, d]
        }
        var q = Heads("q_proj", _qkNorm ? "q_norm" : null);
        var k = Heads("k_proj", _qkNorm ? "k_norm" : null);
        var v = Heads("v_proj", null);
        var inv = torch.tensor(Enumerable.Range(0, (int)d / 2).Select(j => Math.Pow(_theta, -2.0 * j / d)).ToArray());
        var ang = torch.outer(torch.arange(t, ScalarType.Float64), inv);
        var cos = torch.cat([ang.cos(), ang.cos()], -1);
        var sin = torch.cat([ang.sin(), ang.sin()], -1);
        Tensor Rope(Tensor z) => z * cos + torch.cat([-z.narrow(-1, d / 2, d / 2), z.narrow(-1, 0, d / 2)], -1) * sin;
        q = Rope(q); k = Rope(k);
        long group = q.shape[0] / k.shape[0];
        var idx = torch.tensor(Enumerable.Range(0, (int)q.shape[0]).Select(hq => (long)(hq / group)).ToArray());
        k = k.index_select(0, idx); v = v.index_select(0, idx);
        var scores = q.matmul(k.transpose(1, 2)) / Math.Sqrt(d);
        var mask = torch.ones(t, t, ScalarType.Bool).tril();
        scores = scores.masked_fill(mask.logical_not(), double.NegativeInfinity);
        var att = F.softmax(scores, -1).matmul(v).transpose(0, 1).reshape(t, -1);
        return h + Linear(att, W(p + "self_attn.o_proj.weight"), Opt(p + "self_attn.o_proj.bias"));
    }

    /// <summary>The mixture's (or dense MLP's) input: post_attention_layernorm of the stream.</summary>
    public Tensor MlpInput(int i, Tensor h) => Rms(h, W(L(i) + "post_attention_layernorm.weight"));

    /// <summary>Per token (row of x), the chosen experts in descending probability and their weights.</summary>
    public (int[][] Experts, double[][] Weights) Route(int i, Tensor x)
    {
        var logits = Linear(x, W(L(i) + _router + ".weight"));
        var p = F.softmax(logits, -1);
        int n = (int)x.shape[0], e = (int)logits.shape[1];
        var probs = p.data<double>().ToArray();
        var experts = new int[n][];
        var weights = new double[n][];
        for (int t = 0; t < n; t++)
        {
            var row = probs.Skip(t * e).Take(e).ToArray();
            var top = Enumerable.Range(0, e).OrderByDescending(j => row[j]).Take(_topK).ToArray();
            double sum = top.Sum(j => row[j]);
            experts[t] = top;
            weights[t] = top.Select(j => _norm ? row[j] / sum : row[j]).ToArray();
        }
        return (experts, weights);
    }

    /// <summary>Expert e's activations silu(gate x) ⊙ up x for rows x.</summary>
    public Tensor ExpertActivations(int i, int e, Tensor x)
    {
        string p = $"{L(i)}{_experts}.{e}.";
        return F.silu(Linear(x, W(p + _gate + ".weight"))) * Linear(x, W(p + _up + ".weight"));
    }

    public Tensor ExpertDown(int i, int e) => W($"{L(i)}{_experts}.{e}.{_down}.weight");

    /// <summary>The mixture's output for rows x, one token at a time.</summary>
    public Tensor Mixture(int i, Tensor x)
    {
        var (experts, weights) = Route(i, x);
        var rows = new List<Tensor>();
        for (int t = 0; t < x.shape[0]; t++)
        {
            var xt = x.narrow(0, t, 1);
            var y = torch.zeros(1, x.shape[1], ScalarType.Float64);
            for (int r = 0; r < experts[t].Length; r++)
                y = y + weights[t][r] * Linear(ExpertActivations(i, experts[t][r], xt), ExpertDown(i, experts[t][r]));
            rows.Add(y);
        }
        return torch.cat(rows, 0);
    }

    Tensor DenseMlp(int i, Tensor x)
    {
        string p = L(i) + "mlp.";
        return Linear(F.silu(Linear(x, W(p + "gate_proj.weight"))) * Linear(x, W(p + "up_proj.weight")), W(p + "down_proj.weight"));
    }

    /// <summary>The stream after layer i.</summary>
    public Tensor Layer(int i, Tensor h)
    {
        var a = AfterAttention(i, h);
        var x = MlpInput(i, a);
        return a + (Sparse(i) ? Mixture(i, x) : DenseMlp(i, x));
    }

    /// <summary>
    /// The smallest gap, over the tokens and sparse layers of one forward, between the k-th and (k+1)-th router
    /// probability: above float32 rounding, any float32 forward chooses the same experts.
    /// </summary>
    public double RoutingMargin(long[] ids)
    {
        using var scope = NewDisposeScope();
        double margin = double.PositiveInfinity;
        var h = Embed(ids);
        for (int i = 0; i < _layers; i++)
        {
            if (Sparse(i) && Experts(i) > _topK)
            {
                var p = F.softmax(Linear(MlpInput(i, AfterAttention(i, h)), W(L(i) + _router + ".weight")), -1);
                var sorted = p.sort(-1, descending: true).Values;
                margin = Math.Min(margin, (sorted.narrow(1, _topK - 1, 1) - sorted.narrow(1, _topK, 1)).min().item<double>());
            }
            h = Layer(i, h);
        }
        return margin;
    }

    /// <summary>Logits [T, vocab] of one forward from position 0.</summary>
    public Tensor Logits(long[] ids)
    {
        using var scope = NewDisposeScope();
        var h = Embed(ids);
        for (int i = 0; i < _layers; i++) h = Layer(i, h);
        h = Rms(h, W("model.norm.weight"));
        return h.matmul((Opt("lm_head.weight") ?? W("model.embed_tokens.weight")).t()).MoveToOuterDisposeScope();
    }

    public void Dispose()
    {
        foreach (var t in _w.Values) t.Dispose();
    }
}
