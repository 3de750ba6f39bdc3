using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Generation;

/// <summary>
/// Next-token choice: greedy argmax at temperature 0, else softmax(logits / T) cut to the nucleus (the smallest
/// set of most likely tokens holding top-p of the mass) and drawn with a seeded generator, so a seed gives the
/// same tokens on every run.
/// </summary>
public sealed class Sampler : IDisposable
{
    readonly double _temperature, _topP;
    readonly torch.Generator? _generator;

    public Sampler(double temperature, double topP, int seed)
    {
        if (!double.IsFinite(temperature) || temperature < 0) throw new LlmSnpException($"temperature must be a number ≥ 0 (got {temperature})");
        if (!(topP > 0 && topP <= 1)) throw new LlmSnpException($"top-p must be in (0, 1] (got {topP})");
        _temperature = temperature;
        _topP = topP;
        // CPU generator: the draw happens on a CPU copy of the distribution, whatever the device.
        if (temperature > 0) _generator = new torch.Generator((ulong)seed);
    }

    /// <summary>The next token from one position's logits [vocab].</summary>
    public int Next(Tensor logits)
    {
        using var scope = NewDisposeScope();
        if (_temperature == 0) return (int)logits.argmax().item<long>();   // first maximum, as torch.argmax
        // The maximum subtracted first: (l − max) / T ≤ 0, so a tiny T (1e-310) sends the others to −inf (probability 0)
        // instead of the maximum to +inf (inf − inf = NaN in the softmax).
        // The maxima are set to 0 outright: with denormals flushed, 0 / 1e-310 would be NaN.
        var l = logits.to(ScalarType.Float64).cpu();
        var max = l.max();
        var probs = F.softmax(torch.where(l == max, torch.zeros_like(l), (l - max) / _temperature), 0);
        // The whole distribution: no nucleus to cut, so no sort of the vocabulary (the costlier half of a step on OPT's 50k, measured).
        if (_topP >= 1) return (int)probs.multinomial(1, generator: _generator).item<long>();
        // Stable sort: tied tokens keep index order, so a nucleus of one token is exactly the argmax.
        var (sorted, order) = probs.sort(descending: true, stable: true);
        // A token is in the nucleus when the mass before it is below top-p (the most likely one always is).
        var before = sorted.cumsum(0) - sorted;
        var nucleus = sorted * (before < _topP).to(ScalarType.Float64);
        long pick = nucleus.multinomial(1, generator: _generator).item<long>();   // multinomial renormalises
        return (int)order[pick].item<long>();
    }

    public void Dispose() => _generator?.Dispose();
}
