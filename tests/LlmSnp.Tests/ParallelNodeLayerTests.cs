using System.Text.Json.Nodes;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Tests;

/// <summary>
/// Node layers that read one input in parallel and whose consumers' outputs are summed with per-token weights (the
/// experts of a mixture): the engine collects each layer's Gram with its rows weighted as the block's output weighs
/// them, so the reconstructed consumer is the weighted least-squares solution — checked against a direct solve.
/// </summary>
public class ParallelNodeLayerTests
{
    const int Hidden = 6, Units = 10, Experts = 2;

    /// <summary>h + Σ_e p_e(h) · W2_e relu(W1_e h + b1_e), p = softmax(router · h): two experts, every token to both.</summary>
    sealed class MixtureBlock : PrunableBlock
    {
        public MixtureBlock(Dictionary<string, Tensor> w) : base(w, Enumerable.Range(0, Experts).Select(e =>
            new UnitMap($"expert.{e}", NodeKind.Mlp, 1, new[] { new Producer($"e{e}.w1.weight", $"e{e}.w1.bias") }, $"e{e}.w2.weight", $"e{e}.w2.bias")).ToArray()) { }

        public override IReadOnlyList<int[]> SubBlocks => new[] { Enumerable.Range(0, Experts).ToArray() };

        public Tensor Routing(Tensor h) => F.softmax(F.linear(h, W["router.weight"]), -1);

        public override Tensor Activations(int e, Tensor input) => F.relu(F.linear(input, W[$"e{e}.w1.weight"], W[$"e{e}.w1.bias"]));

        public override Tensor Residual(int layer, Tensor input, Tensor activations) => throw new NotSupportedException();

        public override void Collect(int subBlock, Tensor input, Action<int, Tensor, Tensor?> collect)
        {
            using var scope = NewDisposeScope();
            var p = Routing(input);
            for (int e = 0; e < Experts; e++)
                collect(e, Activations(e, input).reshape(-1, Consumer(e).Weight.shape[1]), p.select(-1, e).reshape(-1));
        }

        public override Tensor Advance(int subBlock, Tensor input)
        {
            using var scope = NewDisposeScope();
            var p = Routing(input);
            var h = input.clone();
            for (int e = 0; e < Experts; e++)
            {
                var (w, c) = Consumer(e);
                h += p.select(-1, e).unsqueeze(-1) * F.linear(Activations(e, input), w, c);
            }
            return h.MoveToOuterDisposeScope();
        }
    }

    sealed class MixtureModel : IPrunableModel
    {
        readonly Dictionary<string, Tensor> _w;
        public MixtureModel(Dictionary<string, Tensor> w) => _w = w;
        public string Family => "test";
        public string ModelDir => "";
        public int BlockCount => 1;
        public Device Device => CPU;
        public ScalarType ComputeDType => ScalarType.Float64;
        public ScalarType StoredDType => ScalarType.Float64;
        public Tensor Embed(Tensor inputs) => inputs.clone();
        public IPrunableBlock LoadBlock(int index) => new MixtureBlock(_w.ToDictionary(kv => kv.Key, kv => kv.Value.clone()));
        public Tensor Head(Tensor hidden) => hidden;
        public long ParameterCount() => 0;
        public IEnumerable<(string Name, Tensor Tensor)> OuterTensors(ScalarType dtype) => Array.Empty<(string, Tensor)>();
        public JsonObject PrunedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype) => new();
        public string? NotStockLoadable(IReadOnlyList<KeptBlock> kept) => null;
        public JsonObject PaddedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype) => new();
        public IEnumerable<string> CompanionFiles() => Array.Empty<string>();
        public IReadOnlyList<string> UnusedTensors => Array.Empty<string>();
        public long BytesRead => 0;
        public IReadOnlyDictionary<string, string> SourceHashes() => new Dictionary<string, string>();
        public JsonObject Describe() => new();
        public void Dispose() { }
    }

    [Fact]
    public void Experts_are_reconstructed_by_least_squares_weighted_by_their_routing()
    {
        var g = new Generator(3);
        var w = new Dictionary<string, Tensor>(StringComparer.Ordinal) { ["router.weight"] = randn(new long[] { Experts, Hidden }, ScalarType.Float64, generator: g) * 2 };
        for (int e = 0; e < Experts; e++)
        {
            w[$"e{e}.w1.weight"] = randn(new long[] { Units, Hidden }, ScalarType.Float64, generator: g);
            w[$"e{e}.w1.bias"] = randn(new long[] { Units }, ScalarType.Float64, generator: g) * 0.5;
            w[$"e{e}.w2.weight"] = randn(new long[] { Hidden, Units }, ScalarType.Float64, generator: g);
        }
        var calib = new List<Tensor> { randn(new long[] { 4, 50, Hidden }, ScalarType.Float64, generator: g), randn(new long[] { 3, 40, Hidden }, ScalarType.Float64, generator: g) };
        using var model = new MixtureModel(w);
        var options = new PruneOptions { Policy = RatioPolicyKind.Ratio, Amount = 0.4, Damp = 0, Reconstruct = ReconstructMode.LstsqBias, Ordering = Ordering.Zca };
        var kept = new long[Experts][];
        var consumer = new (Tensor W, Tensor C)[Experts];
        var result = new SnpEngine(model, options).Run(calib, (block, _) =>
        {
            for (int e = 0; e < Experts; e++)
            {
                kept[e] = block.KeptGroups(e);
                var (cw, cb) = block.Consumer(e);
                consumer[e] = (cw.clone(), cb!.clone());
            }
        });
        Assert.Equal(2, result.Layers.Count);
        Assert.All(result.Layers, l => Assert.Equal(6, l.UnitsKept));

        // Direct weighted least squares on every calibration token: min Σ_t p_e(t)² ‖W2 a_t − (W' a_t,K + c')‖².
        using var reference = (MixtureBlock)model.LoadBlock(0);
        var h = cat(calib.Select(c => c.reshape(-1, Hidden)).ToArray());
        var p = reference.Routing(h);
        for (int e = 0; e < Experts; e++)
        {
            var a = reference.Activations(e, h);
            var target = F.linear(a, w[$"e{e}.w2.weight"]);                       // [T, hidden]
            var x = cat(new[] { ones(a.shape[0], 1, ScalarType.Float64), a.index_select(1, tensor(kept[e])) }, 1);
            var sw = p.select(-1, e).unsqueeze(1);
            var sol = linalg.lstsq(x * sw, target * sw).Solution;                    // [1 + kept, hidden]
            var wantC = sol[0];
            var wantW = sol.narrow(0, 1, kept[e].Length).t();
            double dw = ((consumer[e].W - wantW).abs().max() / wantW.abs().max()).item<double>();
            double dc = ((consumer[e].C - wantC).abs().max() / wantC.abs().max()).item<double>();
            Assert.True(dw < 1e-8 && dc < 1e-8, $"expert {e}: weight {dw:G3}, bias {dc:G3}");

            // Unweighted least squares is a different answer: the weighting is what makes this one right.
            var plain = linalg.lstsq(x, target).Solution.narrow(0, 1, kept[e].Length).t();
            Assert.True(((plain - wantW).abs().max() / wantW.abs().max()).item<double>() > 1e-3);
        }
    }
}
