using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Export;
using LlmSnp.Generation;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Evaluation;

/// <summary>One model's speed on this machine: LlmSnp's cached forward and, where the family exports GGUF, llama.cpp on the same weights.</summary>
public sealed record ModelSpeed(InferenceSpeed LlmSnp, LlamaCppSpeed? LlamaCpp, string? LlamaCppSkipped)
{
    public JsonObject ToJson() => new()
    {
        ["llmsnp"] = LlmSnp.ToJson(),
        ["llama_cpp"] = LlamaCpp?.ToJson(),
        ["llama_cpp_skipped"] = LlamaCppSkipped,
    };
}

/// <summary>A pruned model's speed against its dense source, measured in the same run.</summary>
public sealed record SpeedUp(ModelSpeed Dense, ModelSpeed Pruned, double FlopRatio)
{
    public double PrefillSpeedUp => Pruned.LlmSnp.PrefillTokensPerSecond / Dense.LlmSnp.PrefillTokensPerSecond;
    public double DecodeSpeedUp => Dense.LlmSnp.DecodeMsPerToken / Pruned.LlmSnp.DecodeMsPerToken;
    public double? LlamaCppPrefillSpeedUp => Dense.LlamaCpp is { } d && Pruned.LlamaCpp is { } p ? p.PrefillTokensPerSecond / d.PrefillTokensPerSecond : null;
    public double? LlamaCppDecodeSpeedUp => Dense.LlamaCpp is { } d && Pruned.LlamaCpp is { } p ? d.DecodeMsPerToken / p.DecodeMsPerToken : null;

    public JsonObject ToJson() => new()
    {
        ["dense"] = Dense.ToJson(), ["pruned"] = Pruned.ToJson(),
        ["flop_ratio"] = FlopRatio,
        ["llmsnp_prefill_speedup"] = PrefillSpeedUp, ["llmsnp_decode_speedup"] = DecodeSpeedUp,
        ["llama_cpp_prefill_speedup"] = LlamaCppPrefillSpeedUp, ["llama_cpp_decode_speedup"] = LlamaCppDecodeSpeedUp,
    };
}

/// <summary>Measures inference speed: prefill tokens/s at a prompt length and batch-1 decode ms/token.</summary>
public static class InferenceBench
{
    public const int DecodeSteps = 32;

    /// <summary>Best of this many runs: on a shared 2-core machine a single run can be several times slow.</summary>
    public const int Repeats = 3;

    public static ModelSpeed Measure(ILanguageModel model, int promptLength, int decodeSteps = DecodeSteps, Action<string>? log = null)
    {
        var runs = Enumerable.Range(0, Repeats).Select(_ => TextGeneration.MeasureSpeed(model, promptLength, decodeSteps)).ToList();
        var own = runs[0] with { PrefillSeconds = runs.Min(r => r.PrefillSeconds), DecodeSeconds = runs.Min(r => r.DecodeSeconds) };
        log?.Invoke($"speed (LlmSnp): prefill {own.PrefillTokensPerSecond:F0} tokens/s at {promptLength}, decode {own.DecodeMsPerToken:F2} ms/token");
        if (ModelFamilies.Of(model.ModelDir).Gguf is null) return new ModelSpeed(own, null, $"no GGUF export for the {model.Family} family");
        var cpp = LlamaCpp(model.ModelDir, model.StoredDType == ScalarType.Float32 ? GgufDType.F32 : GgufDType.F16, promptLength, decodeSteps, model.VocabSize, log);
        return new ModelSpeed(own, cpp.Speed, cpp.Skipped);
    }

    /// <summary>llama.cpp on the checkpoint exported to a temporary GGUF (removed after); a refused export is a reason, not a failure.</summary>
    public static (LlamaCppSpeed? Speed, string? Skipped) LlamaCpp(string modelDir, GgufDType dtype, int promptLength, int decodeSteps, int vocab, Action<string>? log)
    {
        string tmp = Path.Combine(Path.GetTempPath(), $"llmsnp-speed-{Guid.NewGuid():N}.gguf");
        StagingDirectory.Track(tmp);   // a signal during the timing removes it too
        try
        {
            GgufExport.Run(modelDir, tmp, dtype);
            using var rt = LlamaCppRuntime.Load(tmp, promptLength + decodeSteps, threads: Environment.ProcessorCount);
            var ids = Enumerable.Range(0, promptLength).Select(i => i % vocab).ToArray();
            var s = Enumerable.Range(0, Repeats).Select(_ => rt.Speed(ids, promptLength, decodeSteps, repeats: 1))
                .Aggregate((a, b) => a with { PrefillTokensPerSecond = Math.Max(a.PrefillTokensPerSecond, b.PrefillTokensPerSecond), DecodeMsPerToken = Math.Min(a.DecodeMsPerToken, b.DecodeMsPerToken) });
            log?.Invoke($"speed (llama.cpp, {dtype}): prefill {s.PrefillTokensPerSecond:F0} tokens/s at {promptLength}, decode {s.DecodeMsPerToken:F2} ms/token");
            return (s, null);
        }
        catch (LlmSnpException e)
        {
            log?.Invoke($"speed (llama.cpp): skipped: {e.Message}");
            return (null, e.Message);
        }
        finally
        {
            try { File.Delete(tmp); } catch (IOException) { }
            StagingDirectory.Release(tmp);
        }
    }
}
