using LlmSnp.Export;
using static TorchSharp.torch;

namespace LlmSnp.Models;

public enum Modality { Text, Image }

/// <summary>
/// A model family: the `model_type`s it reads, how to open one, its GGUF exporter for llama.cpp (null: none), and
/// related `model_type`s it recognises but does not read, each with why (the one line a user then sees).
/// </summary>
public sealed record ModelFamily(string Name, IReadOnlyList<string> ModelTypes, Modality Modality, Func<string, Device, ScalarType, IPrunableModel> Open, IGgufExporter? Gguf = null,
    IReadOnlyDictionary<string, string>? Refuses = null);

/// <summary>The registry: `model_type` → family. Jobs open models through it and never name a family.</summary>
public static class ModelFamilies
{
    public static readonly IReadOnlyList<ModelFamily> All = new ModelFamily[]
    {
        new("opt", new[] { "opt" }, Modality.Text, (d, dev, dt) => new OptModel(d, dev, dt)),
        new("llama", LlamaConfig.ModelTypes, Modality.Text, (d, dev, dt) => new LlamaModel(d, dev, dt), new LlamaGguf()),
        new("qwen3", Qwen3Config.ModelTypes, Modality.Text, (d, dev, dt) => new Qwen3Model(d, dev, dt), new Qwen3Gguf()),
        new("gemma", GemmaConfig.ModelTypes, Modality.Text, (d, dev, dt) => new GemmaModel(d, dev, dt), new GemmaGguf(), GemmaConfig.Refuses),
        new("vit", new[] { "vit", "deit" }, Modality.Image, (d, dev, dt) => new VitModel(d, dev, dt)),
        new("mixtral", MixtralConfig.ModelTypes, Modality.Text, (d, dev, dt) => new MoeModel("mixtral", d, MixtralConfig.Load(d), dev, dt), new MixtralGguf()),
        new("qwen3_moe", Qwen3MoeConfig.ModelTypes, Modality.Text, (d, dev, dt) => new MoeModel("qwen3_moe", d, Qwen3MoeConfig.Load(d), dev, dt), new Qwen3MoeGguf()),
    };

    static string Supported => string.Join(", ", All.SelectMany(f => f.ModelTypes));

    /// <summary>The family of a checkpoint directory, from its config.json's model_type.</summary>
    public static ModelFamily Of(string modelDir) => ForType(ConfigFile.Load(modelDir));

    /// <summary>The family that reads a config's model_type, or one line listing the supported ones.</summary>
    public static ModelFamily ForType(ConfigFile cfg)
    {
        Checkpoint.Quantization.Refuse(cfg.Path, cfg.Json);   // before anything reads an int8 code as a weight
        string type = cfg.ModelType;
        if (All.Select(f => f.Refuses?.GetValueOrDefault(type)).FirstOrDefault(why => why is not null) is string refused)
            throw new LlmSnpException($"{cfg.Path}: model_type '{type}' {refused}");
        return All.FirstOrDefault(f => f.ModelTypes.Contains(type))
            ?? throw new LlmSnpException($"{cfg.Path}: model_type '{type}' is not supported (supported: {Supported})");
    }

    /// <summary>Where opening a model says that it ignores stored tensors (stderr in the CLI); null: silent.</summary>
    public static Action<string>? Warn { get; set; }

    static T Opened<T>(T model) where T : IPrunableModel
    {
        if (CheckpointLayout.Warning(model.ModelDir, model.UnusedTensors) is string w) Warn?.Invoke(w);
        return model;
    }

    public static IPrunableModel Open(string modelDir, Device? device = null, ScalarType dtype = ScalarType.Float32) =>
        Opened(Of(modelDir).Open(modelDir, device ?? CPU, dtype));

    /// <summary>Opens a language model, or one clear error naming what the checkpoint is instead.</summary>
    public static ILanguageModel OpenLanguageModel(string modelDir, Device? device = null, ScalarType dtype = ScalarType.Float32, string use = "this command")
    {
        var family = Of(modelDir);
        if (family.Modality != Modality.Text)
            throw new LlmSnpException($"{modelDir}: a {family.Name} image classifier; {use} needs a language model");
        return Opened((ILanguageModel)family.Open(modelDir, device ?? CPU, dtype));
    }

    public static IImageClassifier OpenImageClassifier(string modelDir, Device? device = null, ScalarType dtype = ScalarType.Float32, string use = "this command")
    {
        var family = Of(modelDir);
        if (family.Modality != Modality.Image)
            throw new LlmSnpException($"{modelDir}: a {family.Name} language model; {use} needs an image classifier");
        return Opened((IImageClassifier)family.Open(modelDir, device ?? CPU, dtype));
    }
}
