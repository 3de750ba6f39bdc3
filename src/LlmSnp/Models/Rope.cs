using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>Rotary position embeddings, rotate-half form (HF `apply_rotary_pos_emb`), positions from 0 or a given start.</summary>
public sealed class Rope : IDisposable
{
    readonly Tensor _cos, _sin;   // [maxPositions, headDim], compute dtype

    public Rope(double[] inverseFrequencies, int maxPositions, ScalarType dtype, Device device)
    {
        using var scope = NewDisposeScope();
        var inv = torch.tensor(inverseFrequencies, ScalarType.Float64);
        var pos = torch.arange(maxPositions, ScalarType.Float64);
        var freqs = torch.outer(pos, inv);
        var emb = torch.cat(new[] { freqs, freqs }, 1);
        _cos = emb.cos().to(dtype, device).DetachFromDisposeScope();
        _sin = emb.sin().to(dtype, device).DetachFromDisposeScope();
    }

    /// <summary>q [b, heads, t, d], k [b, kv_heads, t, d] rotated by their positions start..start+t-1 (a cached sequence continues past 0).</summary>
    public (Tensor Q, Tensor K) Apply(Tensor q, Tensor k, int start = 0)
    {
        long t = q.shape[2];
        if (start < 0) throw new ArgumentOutOfRangeException(nameof(start));
        if (start + t > _cos.shape[0]) throw new LlmSnpException($"sequence of {start + t} tokens exceeds max_position_embeddings {_cos.shape[0]}");
        var cos = _cos.narrow(0, start, t);
        var sin = _sin.narrow(0, start, t);
        return (Rotate(q, cos, sin), Rotate(k, cos, sin));
    }

    /// <summary>q [b, heads, t, d], k [b, kv_heads, t, d] rotated by per-token positions [b, t] (packed rows: each token's place in its own sequence).</summary>
    public (Tensor Q, Tensor K) ApplyAt(Tensor q, Tensor k, Tensor positions)
    {
        long b = q.shape[0], t = q.shape[2], d = q.shape[3];
        long max = positions.max().item<long>(), min = positions.min().item<long>();
        if (min < 0) throw new ArgumentOutOfRangeException(nameof(positions));
        if (max >= _cos.shape[0]) throw new LlmSnpException($"position {max} exceeds max_position_embeddings {_cos.shape[0]}");
        var at = positions.reshape(-1).to(_cos.device);
        var cos = _cos.index_select(0, at).view(b, 1, t, d);
        var sin = _sin.index_select(0, at).view(b, 1, t, d);
        return (Rotate(q, cos, sin), Rotate(k, cos, sin));
    }

    /// <summary>x·cos + rotate_half(x)·sin, with one new tensor (five temporaries written out: 3 % of a llama3-8b block).</summary>
    static Tensor Rotate(Tensor x, Tensor cos, Tensor sin)
    {
        long half = x.shape[^1] / 2;
        var r = torch.empty_like(x);
        r.narrow(-1, 0, half).copy_(x.narrow(-1, half, half)).neg_();   // rotate_half: [-x2, x1]
        r.narrow(-1, half, half).copy_(x.narrow(-1, 0, half));
        return r.mul_(sin).addcmul_(x, cos, 1);
    }

    public void Dispose()
    {
        _cos.Dispose();
        _sin.Dispose();
    }
}

/// <summary>`rope_scaling`: none, `linear` or `llama3` (HF `modeling_rope_utils`); any other type is refused.</summary>
public sealed record RopeScaling(string Type, double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositions)
{
    public static RopeScaling From(ConfigFile f, int maxPositions)
    {
        if (f.Json["rope_scaling"] is not JsonObject rs) return new RopeScaling("default", 1, 1, 1, maxPositions);
        string type = rs["rope_type"] is JsonValue rt && rt.TryGetValue<string>(out var t1) ? t1
            : rs["type"] is JsonValue ty && ty.TryGetValue<string>(out var t2) ? t2
            : throw f.Unsupported("rope_scaling", "has no rope_type");
        // Every field must be a positive finite number: a negative or zero factor turns the positions around or
        // divides by zero, and the model then computes garbage that no later check sees (eval, generate and prune alike).
        double Num(string field, double? fallback = null)
        {
            var n = rs[field];
            if (n == null && fallback is double x) return x;
            if (n is JsonValue v && v.TryGetValue<double>(out var d))
                return double.IsFinite(d) && d > 0 ? d : throw f.Unsupported("rope_scaling", $"field '{field}' is {d}; it must be a positive number");
            throw f.Unsupported("rope_scaling", $"field '{field}' is missing or not a number");
        }
        switch (type)
        {
            case "default": return new RopeScaling("default", 1, 1, 1, maxPositions);
            case "linear": return new RopeScaling("linear", Num("factor"), 1, 1, maxPositions);
            case "llama3":
                double low = Num("low_freq_factor"), high = Num("high_freq_factor");
                if (!(high > low)) throw f.Unsupported("rope_scaling", $"high_freq_factor {high} must be above low_freq_factor {low} (the smoothing divides by their difference)");
                double original = Num("original_max_position_embeddings");
                if (original != Math.Floor(original) || original > int.MaxValue) throw f.Unsupported("rope_scaling", $"field 'original_max_position_embeddings' is {original}; it must be a positive integer");
                return new RopeScaling("llama3", Num("factor"), low, high, (int)original);
            default: throw f.Unsupported("rope_scaling", $"type '{type}' is not supported (linear, llama3)");
        }
    }

    /// <summary>Inverse frequencies θ^(−2i/d), scaled as the type says, in float64.</summary>
    public double[] InverseFrequencies(int headDim, double theta)
    {
        var inv = Enumerable.Range(0, headDim / 2).Select(i => 1.0 / Math.Pow(theta, 2.0 * i / headDim)).ToArray();
        switch (Type)
        {
            case "linear":
                return inv.Select(x => x / Factor).ToArray();
            case "llama3":
                {
                    double lowWavelen = OriginalMaxPositions / LowFreqFactor, highWavelen = OriginalMaxPositions / HighFreqFactor;
                    return inv.Select(x =>
                    {
                        double wavelen = 2 * Math.PI / x;
                        if (wavelen < highWavelen) return x;               // high frequencies: unchanged
                        if (wavelen > lowWavelen) return x / Factor;       // low frequencies: scaled
                        double smooth = (OriginalMaxPositions / wavelen - LowFreqFactor) / (HighFreqFactor - LowFreqFactor);
                        return (1 - smooth) * x / Factor + smooth * x;
                    }).ToArray();
                }
            default:
                return inv;
        }
    }
}
