using System.Text.Json;
using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>
/// Rotary position embeddings, rotate-half form (HF `apply_rotary_pos_emb`), positions from 0 or a given start.
/// The tables may cover only the first dims of a head (partial rotary: the rest pass through), carry an attention
/// factor (yarn, longrope: it multiplies cos and sin), and hold a second, long table (longrope) used by calls that
/// reach past the original context.
/// </summary>
public sealed class Rope : IDisposable
{
    readonly Tensor _cos, _sin;   // [maxPositions, rotaryDim], compute dtype
    readonly Tensor? _cosLong, _sinLong;
    readonly int _longAbove;

    public Rope(double[] inverseFrequencies, int maxPositions, ScalarType dtype, Device device)
    {
        (_cos, _sin) = Table(inverseFrequencies, maxPositions, 1.0, dtype, device);
        _longAbove = int.MaxValue;
    }

    /// <param name="attentionFactor">Multiplies cos and sin (HF `attention_scaling`): the rotated part of q·k scales by its square.</param>
    /// <param name="longInverseFrequencies">
    /// A second table (longrope's long factors), used by every call whose last position + 1 exceeds
    /// <paramref name="longAbove"/> (HF `longrope_frequency_update`: the choice is made per forward from its positions).
    /// </param>
    public Rope(double[] inverseFrequencies, int maxPositions, ScalarType dtype, Device device, double attentionFactor,
        double[]? longInverseFrequencies = null, int longAbove = int.MaxValue)
    {
        if (longInverseFrequencies is not null && longInverseFrequencies.Length != inverseFrequencies.Length)
            throw new ArgumentException("the long table must have as many frequencies as the short one", nameof(longInverseFrequencies));
        (_cos, _sin) = Table(inverseFrequencies, maxPositions, attentionFactor, dtype, device);
        try
        {
            if (longInverseFrequencies is not null) (_cosLong, _sinLong) = Table(longInverseFrequencies, maxPositions, attentionFactor, dtype, device);
        }
        catch
        {
            Dispose();
            throw;
        }
        _longAbove = longInverseFrequencies is null ? int.MaxValue : longAbove;
    }

    static (Tensor Cos, Tensor Sin) Table(double[] inverseFrequencies, int maxPositions, double attentionFactor, ScalarType dtype, Device device)
    {
        using var scope = NewDisposeScope();
        var inv = torch.tensor(inverseFrequencies, ScalarType.Float64);
        var pos = torch.arange(maxPositions, ScalarType.Float64);
        var freqs = torch.outer(pos, inv);
        var emb = torch.cat(new[] { freqs, freqs }, 1);
        Tensor cos = emb.cos(), sin = emb.sin();
        if (attentionFactor != 1.0) { cos = cos * attentionFactor; sin = sin * attentionFactor; }
        return (cos.to(dtype, device).DetachFromDisposeScope(), sin.to(dtype, device).DetachFromDisposeScope());
    }

    /// <summary>Dims of each head that are rotated (the first ones; a head may be longer: the rest pass through).</summary>
    public int RotaryDim => (int)_cos.shape[1];

    /// <summary>Whether a call covering positions ..<paramref name="end"/>−1 uses the long table (longrope).</summary>
    public bool UsesLongTable(long end) => _cosLong is not null && end > _longAbove;

    /// <summary>
    /// q [b, heads, t, d], k [b, kv_heads, t, d] rotated by their positions start..start+t-1 (a cached sequence continues past 0).
    /// With a long table, the call's last position picks the table for all its tokens.
    /// </summary>
    public (Tensor Q, Tensor K) Apply(Tensor q, Tensor k, int start = 0)
    {
        long t = q.shape[2];
        if (start < 0) throw new ArgumentOutOfRangeException(nameof(start));
        if (start + t > _cos.shape[0]) throw new LlmSnpException($"sequence of {start + t} tokens exceeds max_position_embeddings {_cos.shape[0]}");
        if (q.shape[^1] < RotaryDim) throw new ArgumentException($"heads of {q.shape[^1]} dims are shorter than the rotary dimension {RotaryDim}");
        bool useLong = UsesLongTable(start + t);
        var cos = (useLong ? _cosLong! : _cos).narrow(0, start, t);
        var sin = (useLong ? _sinLong! : _sin).narrow(0, start, t);
        return (Rotate(q, cos, sin), Rotate(k, cos, sin));
    }

    /// <summary>
    /// q [b, heads, t, d], k [b, kv_heads, t, d] rotated by per-token positions [b, t] (packed rows: each token's place in its
    /// own sequence). With a long table (longrope) the caller's mask <paramref name="attend"/> [b, t, t] tells each token's
    /// sequence: its end is the last position of a token that reads it, and a sequence that reaches past the original
    /// context uses the long table, as one forward of that sequence alone does. A token read by sequences on both sides
    /// of the switch (a shared context) cannot have both rotations: refused.
    /// </summary>
    public (Tensor Q, Tensor K) ApplyAt(Tensor q, Tensor k, Tensor positions, Tensor? attend = null)
    {
        long b = q.shape[0], t = q.shape[2], r = RotaryDim;
        long max = positions.max().item<long>(), min = positions.min().item<long>();
        if (min < 0) throw new ArgumentOutOfRangeException(nameof(positions));
        if (max >= _cos.shape[0]) throw new LlmSnpException($"position {max} exceeds max_position_embeddings {_cos.shape[0]}");
        var at = positions.reshape(-1).to(_cos.device);
        var cos = _cos.index_select(0, at).view(b, 1, t, r);
        var sin = _sin.index_select(0, at).view(b, 1, t, r);
        if (_cosLong is not null && max + 1 > _longAbove)
        {
            if (attend is null) throw new ArgumentException("a long RoPE table needs the packed rows' mask to tell each token's sequence", nameof(attend));
            var readerPos = torch.where(attend, positions.unsqueeze(2), torch.tensor(-1L, device: positions.device));
            var useLong = readerPos.max(1).values.add(1).gt(_longAbove);   // [b, t]: per key, its sequence's length passes the switch
            if (attend.logical_and(useLong.unsqueeze(2).ne(useLong.unsqueeze(1))).any().item<bool>())
                throw new LlmSnpException($"packed rows share tokens between sequences on both sides of longrope's switch at {_longAbove} positions; pack such sequences apart");
            var pick = useLong.to(_cos.device).view(b, 1, t, 1);
            cos = torch.where(pick, _cosLong.index_select(0, at).view(b, 1, t, r), cos);
            sin = torch.where(pick, _sinLong!.index_select(0, at).view(b, 1, t, r), sin);
        }
        return (Rotate(q, cos, sin), Rotate(k, cos, sin));
    }

    /// <summary>x·cos + rotate_half(x)·sin, with one new tensor (five temporaries written out: 3 % of a llama3-8b block).</summary>
    static Tensor Rotate(Tensor x, Tensor cos, Tensor sin)
    {
        long rot = cos.shape[^1];
        if (rot != x.shape[^1]) return RotatePartial(x, cos, sin, rot);
        long half = x.shape[^1] / 2;
        var r = torch.empty_like(x);
        r.narrow(-1, 0, half).copy_(x.narrow(-1, half, half)).neg_();   // rotate_half: [-x2, x1]
        r.narrow(-1, half, half).copy_(x.narrow(-1, 0, half));
        return r.mul_(sin).addcmul_(x, cos, 1);
    }

    /// <summary>Partial rotary (HF Phi-3): dims [0, rot) rotate, rotate_half within them; dims [rot, d) pass through unchanged.</summary>
    static Tensor RotatePartial(Tensor x, Tensor cos, Tensor sin, long rot)
    {
        long half = rot / 2, d = x.shape[^1];
        var r = torch.empty_like(x);
        var xr = x.narrow(-1, 0, rot);
        var rr = r.narrow(-1, 0, rot);
        rr.narrow(-1, 0, half).copy_(xr.narrow(-1, half, half)).neg_();
        rr.narrow(-1, half, half).copy_(xr.narrow(-1, 0, half));
        rr.mul_(sin).addcmul_(xr, cos, 1);
        r.narrow(-1, rot, d - rot).copy_(x.narrow(-1, rot, d - rot));
        return r;
    }

    public void Dispose()
    {
        _cos?.Dispose();
        _sin?.Dispose();
        _cosLong?.Dispose();
        _sinLong?.Dispose();
    }
}

/// <summary>
/// `rope_scaling` (HF `modeling_rope_utils`): none, `linear`, `llama3`, `dynamic`, `yarn` or `longrope`; any other type
/// is refused. The positional fields serve linear and llama3; the others are read into the init-only properties.
/// </summary>
public sealed record RopeScaling(string Type, double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositions)
{
    /// <summary>The config's max_position_embeddings (dynamic NTK rescales θ relative to it).</summary>
    public int MaxPositions { get; init; }
    /// <summary>rope_scaling.attention_factor (yarn, longrope); null: derived from the factor as HF does.</summary>
    public double? AttentionFactorField { get; init; }
    /// <summary>yarn: the ramp's rotation bounds (HF defaults 32 and 1; 0 also means the default).</summary>
    public double BetaFast { get; init; } = 32;
    public double BetaSlow { get; init; } = 1;
    /// <summary>longrope: per-frequency divisors for sequences within the original context (short) and beyond it (long).</summary>
    public IReadOnlyList<double>? ShortFactor { get; init; }
    public IReadOnlyList<double>? LongFactor { get; init; }

    /// <param name="originalMaxPositions">
    /// The family's original (pre-extension) context for longrope when the config holds it outside rope_scaling (Phi-3's
    /// top-level `original_max_position_embeddings`, default 4096); null: that top-level field if present, else
    /// max_position_embeddings.
    /// </param>
    /// <param name="longRopeAliases">Type names a family reads as longrope (Phi-3's config maps the old "su" and "yarn" to it).</param>
    public static RopeScaling From(ConfigFile f, int maxPositions, int? originalMaxPositions = null, IReadOnlyCollection<string>? longRopeAliases = null)
    {
        if (f.Json["rope_scaling"] is not JsonObject rs) return new RopeScaling("default", 1, 1, 1, maxPositions) { MaxPositions = maxPositions };
        string type = rs["rope_type"] is JsonValue rt && rt.TryGetValue<string>(out var t1) ? t1
            : rs["type"] is JsonValue ty && ty.TryGetValue<string>(out var t2) ? t2
            : throw f.Unsupported("rope_scaling", "has no rope_type");
        if (longRopeAliases?.Contains(type) == true) type = "longrope";
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
        double Positive(string field, double? fallback = null)
        {
            double x = Num(field, fallback);
            if (!(x > 0) || !double.IsFinite(x)) throw f.Unsupported("rope_scaling", $"field '{field}' is {x}; must be a positive number");
            return x;
        }
        IReadOnlyList<double> Factors(string field)
        {
            if (rs[field] is not JsonArray a) throw f.Unsupported("rope_scaling", $"field '{field}' is missing or not a list of numbers");
            var r = new double[a.Count];
            for (int i = 0; i < a.Count; i++)
                if (a[i] is not JsonValue v || !v.TryGetValue<JsonElement>(out var e) || e.ValueKind != JsonValueKind.Number || !(e.GetDouble() > 0) || !double.IsFinite(e.GetDouble()))
                    throw f.Unsupported("rope_scaling", $"field '{field}'[{i}] is not a positive number");
                else r[i] = e.GetDouble();
            return r;
        }
        switch (type)
        {
            case "default": return new RopeScaling("default", 1, 1, 1, maxPositions) { MaxPositions = maxPositions };
            case "linear": return new RopeScaling("linear", Num("factor"), 1, 1, maxPositions) { MaxPositions = maxPositions };
            case "llama3":
                {
                    double low = Num("low_freq_factor"), high = Num("high_freq_factor");
                    if (!(high > low)) throw f.Unsupported("rope_scaling", $"high_freq_factor {high} must be above low_freq_factor {low} (the smoothing divides by their difference)");
                    return new RopeScaling("llama3", Num("factor"), low, high, (int)Num("original_max_position_embeddings"))
                        { MaxPositions = maxPositions };
                }
            case "dynamic":
                return new RopeScaling("dynamic", Positive("factor"), 1, 1, maxPositions) { MaxPositions = maxPositions };
            case "yarn":
                {
                    // HF 4.48 `_compute_yarn_parameters`: the ramp is computed over max_position_embeddings; beta_fast /
                    // beta_slow are read as `get(x) or default`, so 0 also means the default.
                    double Beta(string field, double fallback) { double b = Num(field, fallback); return b == 0 ? fallback : b; }
                    return new RopeScaling("yarn", Positive("factor"), 1, 1, maxPositions)
                    {
                        MaxPositions = maxPositions, AttentionFactorField = rs["attention_factor"] is null ? null : Positive("attention_factor"),
                        BetaFast = Beta("beta_fast", 32), BetaSlow = Beta("beta_slow", 1),
                    };
                }
            case "longrope":
                {
                    // HF 4.48 `_compute_longrope_parameters`: with a top-level original_max_position_embeddings (Phi3Config
                    // always has one) the factor is max_position_embeddings / original, whatever rope_scaling.factor says;
                    // without one the original context is max_position_embeddings and the factor rope_scaling's.
                    int? top = originalMaxPositions ?? (f.Json["original_max_position_embeddings"] is JsonNode ? f.Int("original_max_position_embeddings") : null);
                    int orig = top ?? maxPositions;
                    double? attention = rs["attention_factor"] is null ? null : Positive("attention_factor");
                    double factor = top is int o ? (double)maxPositions / o
                        : attention is null ? Positive("factor") : rs["factor"] is null ? 1.0 : Positive("factor");
                    return new RopeScaling("longrope", factor, 1, 1, orig)
                    {
                        MaxPositions = maxPositions, AttentionFactorField = attention,
                        ShortFactor = Factors("short_factor"), LongFactor = Factors("long_factor"),
                    };
                }
            default:
                throw f.Unsupported("rope_scaling", $"type '{type}' is not supported (linear, llama3, dynamic, yarn, longrope)");
        }
    }

    /// <summary>The config's scaling, checked against the heads' rotary dimension (<see cref="From"/> then <see cref="Check"/>).</summary>
    public static RopeScaling For(ConfigFile f, int maxPositions, int rotaryDim)
    {
        var r = From(f, maxPositions);
        r.Check(f, rotaryDim);
        return r;
    }

    /// <summary>Refuses what this scaling cannot do with a head's rotary dimension (checked with the config, before any weight is read).</summary>
    public void Check(ConfigFile f, int rotaryDim)
    {
        if (Type == "dynamic" && rotaryDim <= 2)
            throw f.Unsupported("rope_scaling", $"is dynamic with a rotary dimension of {rotaryDim}; HF's θ·(…)^(d/(d−2)) needs d > 2");
        if (Type == "longrope")
            foreach (var (name, list) in new[] { ("short_factor", ShortFactor!), ("long_factor", LongFactor!) })
                if (list.Count != rotaryDim / 2)
                    throw f.Unsupported("rope_scaling", $"field '{name}' has {list.Count} entries; a rotary dimension of {rotaryDim} needs {rotaryDim / 2}");
    }

    /// <summary>
    /// The multiplier of cos and sin: yarn attention_factor, else 0.1·ln(factor) + 1; longrope attention_factor, else
    /// √(1 + ln factor / ln original context) for factor > 1;
    /// 1 for every other type.
    /// </summary>
    public double AttentionFactor => Type switch
    {
        "yarn" => AttentionFactorField ?? 0.1 * Math.Log(Factor) + 1.0,
        "longrope" => AttentionFactorField ?? (Factor <= 1 ? 1.0 : Math.Sqrt(1 + Math.Log(Factor) / Math.Log(OriginalMaxPositions))),
        _ => 1.0,
    };

    /// <summary>Inverse frequencies θ^(−2i/d) (d the rotary dimension), scaled as the type says, in float64; longrope: its short factors.</summary>
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
            case "dynamic":
                {
                    // HF rescales θ by the sequence length L once L passes max_position_embeddings; LlmSnp never runs
                    // longer sequences, so L = max_position_embeddings, HF's own value up to it (the multiplier is 1).
                    double seqLen = MaxPositions, d = headDim;
                    double b = theta * Math.Pow(Factor * seqLen / MaxPositions - (Factor - 1), d / (d - 2));
                    return Enumerable.Range(0, headDim / 2).Select(i => 1.0 / Math.Pow(b, 2.0 * i / headDim)).ToArray();
                }
            case "yarn":
                return Yarn(headDim, theta);
            case "longrope":
                return inv.Select((x, i) => x / ShortFactor![i]).ToArray();
            default:
                return inv;
        }
    }

    /// <summary>longrope's table for sequences past the original context: θ^(−2i/d) / long_factor[i].</summary>
    public double[] LongInverseFrequencies(int headDim, double theta)
    {
        if (Type != "longrope") throw new InvalidOperationException($"{Type} scaling has no long table");
        return Enumerable.Range(0, headDim / 2).Select(i => 1.0 / Math.Pow(theta, 2.0 * i / headDim) / LongFactor![i]).ToArray();
    }

    /// <summary>
    /// YaRN (HF `_compute_yarn_parameters`): frequencies that turn fewer than beta_slow times over the original context
    /// are interpolated (÷ factor), those turning more than beta_fast times kept, a linear ramp between the two dims.
    /// </summary>
    double[] Yarn(int dim, double theta)
    {
        double CorrectionDim(double rotations) => dim * Math.Log(OriginalMaxPositions / (rotations * 2 * Math.PI)) / (2 * Math.Log(theta));
        double low = CorrectionDim(BetaFast), high = CorrectionDim(BetaSlow);
        low = Math.Floor(low); high = Math.Ceiling(high);
        low = Math.Max(low, 0);
        high = Math.Min(high, dim - 1);
        if (low == high) high += 0.001;   // HF: prevents a zero-width ramp
        return Enumerable.Range(0, dim / 2).Select(i =>
        {
            double pos = Math.Pow(theta, 2.0 * i / dim);
            double extrapolation = 1 / pos, interpolation = 1 / (Factor * pos);
            double ramp = Math.Clamp((i - low) / (high - low), 0, 1);
            double keep = 1 - ramp;   // share of the unscaled frequency
            return interpolation * (1 - keep) + extrapolation * keep;
        }).ToArray();
    }

    /// <summary>The RoPE tables of this scaling for heads whose first <paramref name="rotaryDim"/> dims rotate.</summary>
    public Rope Build(int rotaryDim, double theta, int maxPositions, ScalarType dtype, Device device) => Type == "longrope"
        ? new Rope(InverseFrequencies(rotaryDim, theta), maxPositions, dtype, device, AttentionFactor, LongInverseFrequencies(rotaryDim, theta), OriginalMaxPositions)
        : new Rope(InverseFrequencies(rotaryDim, theta), maxPositions, dtype, device, AttentionFactor);
}
