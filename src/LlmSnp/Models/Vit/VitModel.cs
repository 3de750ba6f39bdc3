using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Pruning;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>The fields of a ViT/DeiT config.json the forward depends on (models.md §3).</summary>
public sealed class VitConfig
{
    public required ConfigFile File { get; init; }
    public required string ModelType { get; init; }
    public int Hidden { get; init; }
    public int Layers { get; init; }
    public int Heads { get; init; }
    public int Intermediate { get; init; }
    public int ImageSize { get; init; }
    public int PatchSize { get; init; }
    public int Channels { get; init; }
    public double LayerNormEps { get; init; }
    public int HeadDim => Hidden / Heads;
    public int Patches => (ImageSize / PatchSize) * (ImageSize / PatchSize);
    public required int[] IntermediateSizes { get; init; }
    public required int[] HeadsPerLayer { get; init; }
    public bool Pruned { get; init; }

    public static VitConfig From(ConfigFile f, bool timmLayout)
    {
        string type = f.ModelType;
        if (type is not ("vit" or "deit")) throw new LlmSnpException($"{f.Path}: model_type '{type}' is not ViT or DeiT");
        int hidden = f.Int("hidden_size"), heads = f.Int("num_attention_heads"), layers = f.Layers();
        if (hidden % heads != 0) throw f.Unsupported("num_attention_heads", $"({heads}) does not divide hidden_size ({hidden})");
        string act = f.Has("hidden_act") ? f.String("hidden_act") : "gelu";
        if (act != "gelu") throw f.Unsupported("hidden_act", $"is '{act}'; only exact gelu is supported");
        if (!f.Bool("qkv_bias", true)) throw f.Unsupported("qkv_bias", "is false; ViT without q/k/v biases is not supported");
        if (f.Json["patch_size"] is JsonArray) throw f.Unsupported("patch_size", "is not a single integer; non-square patches are not supported");
        if (f.Json["image_size"] is JsonArray) throw f.Unsupported("image_size", "is not a single integer; non-square images are not supported");
        int image = f.Int("image_size", 224), patch = f.Int("patch_size", 16);
        if (image % patch != 0) throw f.Unsupported("patch_size", $"({patch}) does not divide image_size ({image})");
        int inter = f.Int("intermediate_size");
        var headsPerLayer = f.IntList("num_heads_per_layer", layers);
        if (headsPerLayer == null && f.Json["pruned_heads"] is JsonObject ph)   // stock HF pruning: heads removed per layer
        {
            headsPerLayer = Enumerable.Repeat(heads, layers).ToArray();
            foreach (var (k, v) in ph)
                if (int.TryParse(k, out int l) && l >= 0 && l < layers && v is JsonArray arr) headsPerLayer[l] = heads - arr.Count;
                else throw f.Unsupported("pruned_heads", $"has an invalid entry '{k}'");
        }
        return new VitConfig
        {
            File = f, ModelType = type, Hidden = hidden, Layers = layers, Heads = heads, Intermediate = inter,
            ImageSize = image, PatchSize = patch, Channels = f.Int("num_channels", 3),
            // Each layout keeps its own default: timm trains with 1e-6, HF configs say 1e-12.
            LayerNormEps = f.Double("layer_norm_eps", timmLayout ? 1e-6 : 1e-12),
            IntermediateSizes = f.IntList("intermediate_sizes", layers) ?? Enumerable.Repeat(inter, layers).ToArray(),
            HeadsPerLayer = headsPerLayer ?? Enumerable.Repeat(heads, layers).ToArray(),
            Pruned = f.Bool("pruned", false),
        };
    }
}

/// <summary>
/// ViT / DeiT image classifiers in HF (`vit.`, `deit.`) or timm layout (fused qkv), streamed block
/// by block like OPT. DeiT distilled models average the class and distillation heads.
/// </summary>
public sealed class VitModel : StreamedModel, IImageClassifier
{
    public string Family => "vit";
    public VitConfig Config { get; }
    public int BlockCount => Config.Layers;
    public bool Timm { get; }
    public bool Distilled { get; }
    /// <summary>"vit." or "deit." for HF layouts, "" for timm.</summary>
    readonly string _p;
    readonly Dictionary<string, Tensor> _outer = new(StringComparer.Ordinal);

    public VitModel(string modelDir, Device? device = null, ScalarType computeDType = ScalarType.Float32)
        : this(modelDir, ConfigFile.Load(modelDir), device, computeDType) { }

    /// <summary>config.json is read first (its layout defaults depend on the weights' names, so it is parsed after they open).</summary>
    VitModel(string modelDir, ConfigFile cfgFile, Device? device, ScalarType computeDType)
        : base(modelDir, device, computeDType, "preprocessor_config.json")
    {
        try
        {
            Timm = Checkpoint.Has("patch_embed.proj.weight");
            _p = Timm ? "" : Checkpoint.Has("deit.embeddings.cls_token") ? "deit." : Checkpoint.Has("vit.embeddings.cls_token") ? "vit."
                : throw new LlmSnpException($"{modelDir}: no ViT embedding tensors (vit.embeddings.cls_token, deit.embeddings.cls_token or patch_embed.proj.weight)");
            Config = VitConfig.From(cfgFile, Timm);
            Distilled = Checkpoint.Has(Timm ? "dist_token" : _p + "embeddings.distillation_token");
            StoredDType = SafeDTypes.ToTorch(Checkpoint.Entry(Name(OuterRole.PatchW)).DType);
            var c = Config;
            int tokens = 1 + (Distilled ? 1 : 0) + c.Patches;
            Load(OuterRole.Cls, 1, 1, c.Hidden);
            if (Distilled) Load(OuterRole.Dist, 1, 1, c.Hidden);
            Load(OuterRole.Pos, 1, tokens, c.Hidden);
            Load(OuterRole.PatchW, c.Hidden, c.Channels, c.PatchSize, c.PatchSize);
            Load(OuterRole.PatchB, c.Hidden);
            Load(OuterRole.NormW, c.Hidden);
            Load(OuterRole.NormB, c.Hidden);
            var headW = Checkpoint.Entry(Name(OuterRole.HeadW));
            if (headW.Shape.Length != 2 || headW.Shape[1] != c.Hidden)
                throw new LlmSnpException($"{modelDir}: tensor '{headW.Name}' has shape [{string.Join(", ", headW.Shape)}], expected [classes, {c.Hidden}]");
            long classes = headW.Shape[0];
            Load(OuterRole.HeadW, classes, c.Hidden);
            Load(OuterRole.HeadB, classes);
            if (Distilled)
            {
                Load(OuterRole.DistHeadW, classes, c.Hidden);
                Load(OuterRole.DistHeadB, classes);
            }
            UnusedTensors = CheckpointLayout.Check(Checkpoint, modelDir, c.Layers, ExpectedTensors());
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    enum OuterRole { Cls, Dist, Pos, PatchW, PatchB, NormW, NormB, HeadW, HeadB, DistHeadW, DistHeadB }

    string Name(OuterRole r) => Timm
        ? r switch
        {
            OuterRole.Cls => "cls_token", OuterRole.Dist => "dist_token", OuterRole.Pos => "pos_embed",
            OuterRole.PatchW => "patch_embed.proj.weight", OuterRole.PatchB => "patch_embed.proj.bias",
            OuterRole.NormW => "norm.weight", OuterRole.NormB => "norm.bias", OuterRole.HeadW => "head.weight", OuterRole.HeadB => "head.bias",
            OuterRole.DistHeadW => "head_dist.weight", _ => "head_dist.bias",
        }
        : r switch
        {
            OuterRole.Cls => _p + "embeddings.cls_token", OuterRole.Dist => _p + "embeddings.distillation_token",
            OuterRole.Pos => _p + "embeddings.position_embeddings",
            OuterRole.PatchW => _p + "embeddings.patch_embeddings.projection.weight", OuterRole.PatchB => _p + "embeddings.patch_embeddings.projection.bias",
            OuterRole.NormW => _p + "layernorm.weight", OuterRole.NormB => _p + "layernorm.bias",
            OuterRole.HeadW => Distilled ? "cls_classifier.weight" : "classifier.weight",
            OuterRole.HeadB => Distilled ? "cls_classifier.bias" : "classifier.bias",
            OuterRole.DistHeadW => "distillation_classifier.weight", _ => "distillation_classifier.bias",
        };

    void Load(OuterRole r, params long[] shape) => _outer[Name(r)] = Resident(Read(Name(r), shape));
    Tensor Outer(OuterRole r) => _outer[Name(r)];

    Tensor Read(string name, params long[] shape) => ReadAs(name, ComputeDType, shape);

    /// <summary>Pixels [batch, channels, size, size] (already normalised) → tokens [batch, 1 (+1) + patches, hidden].</summary>
    public Tensor Embed(Tensor pixels)
    {
        using var scope = NewDisposeScope();
        var c = Config;
        if (pixels.dim() != 4 || pixels.shape[1] != c.Channels || pixels.shape[2] != c.ImageSize || pixels.shape[3] != c.ImageSize)
            throw new LlmSnpException($"images must be [batch, {c.Channels}, {c.ImageSize}, {c.ImageSize}], got [{string.Join(", ", pixels.shape)}]");
        long b = pixels.shape[0];
        var x = F.conv2d(pixels.to(ComputeDType, Device), Outer(OuterRole.PatchW), Outer(OuterRole.PatchB), strides: new long[] { c.PatchSize, c.PatchSize });
        x = x.flatten(2).transpose(1, 2);
        var tokens = new List<Tensor> { Outer(OuterRole.Cls).expand(b, -1, -1) };
        if (Distilled) tokens.Add(Outer(OuterRole.Dist).expand(b, -1, -1));
        tokens.Add(x);
        var h = torch.cat(tokens, 1) + Outer(OuterRole.Pos);
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>Final norm and classifier(s) → logits [batch, classes].</summary>
    public Tensor Head(Tensor h)
    {
        using var scope = NewDisposeScope();
        h = F.layer_norm(h, new long[] { Config.Hidden }, Outer(OuterRole.NormW), Outer(OuterRole.NormB), Config.LayerNormEps);
        var logits = F.linear(h.select(1, 0), Outer(OuterRole.HeadW), Outer(OuterRole.HeadB));
        if (Distilled) logits = (logits + F.linear(h.select(1, 1), Outer(OuterRole.DistHeadW), Outer(OuterRole.DistHeadB))) / 2;
        return logits.MoveToOuterDisposeScope();
    }

    public VitBlock LoadBlock(int i)
    {
        var c = Config;
        long a = (long)c.HeadsPerLayer[i] * c.HeadDim, h = c.Hidden;
        var shapes = VitBlock.Shapes(a, c.IntermediateSizes[i], h);
        string prefix = Timm ? $"blocks.{i}." : $"{_p}encoder.layer.{i}.";
        var names = VitBlock.LocalNames(Timm);
        var w = PrunableBlock.ReadAll(w =>
        {
            if (Timm)
            {
                // Fused qkv [3a, h]: q, k, v stacked in that order.
                using var qkv = Read(prefix + "attn.qkv.weight", 3 * a, h);
                using var qkvB = Read(prefix + "attn.qkv.bias", 3 * a);
                var ws = qkv.chunk(3, 0); var bs = qkvB.chunk(3, 0);
                for (int k = 0; k < 3; k++)
                {
                    w[prefix + names[2 + 2 * k]] = ws[k].contiguous();
                    w[prefix + names[3 + 2 * k]] = bs[k].contiguous();
                }
            }
            for (int k = 0; k < names.Length; k++)
                if (!names[k].StartsWith(VitBlock.QkvPart)) w[prefix + names[k]] = Read(prefix + names[k], shapes[k]);
        });
        // Write order is the checkpoint's: the layout's names in table order.
        var ordered = names.ToDictionary(n => prefix + n, n => w[prefix + n], StringComparer.Ordinal);
        return new VitBlock(prefix, Timm, c.Hidden, c.HeadDim, c.LayerNormEps, Timm ? $"blocks.{i}" : $"encoder.layer.{i}", ordered) { Recycler = Checkpoint.Recycle };
    }

    IPrunableBlock IPrunableModel.LoadBlock(int index) => LoadBlock(index);

    /// <summary>Full forward with every block loaded at once (reference path for tests).</summary>
    public Tensor ForwardAllInMemory(Tensor pixels)
    {
        using var scope = NewDisposeScope();
        var h = Embed(pixels);
        for (int i = 0; i < BlockCount; i++)
            using (var b = LoadBlock(i)) h = b.Forward(h)!;
        return Head(h).MoveToOuterDisposeScope();
    }

    public IEnumerable<(string Name, Tensor Tensor)> OuterTensors(ScalarType dtype) =>
        _outer.Select(kv => (kv.Key, kv.Value.to(dtype)));

    public JsonObject PrunedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        cfg["pruned"] = true;
        cfg["intermediate_sizes"] = new JsonArray(kept.Select(k => (JsonNode)k.Groups[1].Length).ToArray());
        cfg["num_heads_per_layer"] = new JsonArray(kept.Select(k => (JsonNode)k.Groups[0].Length).ToArray());
        // Stock transformers re-applies pruned_heads on load, so a heads-only pruned ViT loads as is.
        var pruned = new JsonObject();
        for (int l = 0; l < kept.Count; l++)
        {
            var removed = Enumerable.Range(0, Config.Heads).Where(h => !kept[l].Groups[0].Contains(h)).ToArray();
            if (removed.Length > 0) pruned[l.ToString()] = new JsonArray(removed.Select(h => (JsonNode)h).ToArray());
        }
        cfg["pruned_heads"] = pruned;
        // One MLP width for every layer goes in the stock field (heads may differ per layer: pruned_heads says which).
        var mlp = kept.Select(k => k.Groups[1].Length).Distinct().ToArray();
        if (mlp.Length == 1) cfg["intermediate_size"] = mlp[0];
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    public string? NotStockLoadable(IReadOnlyList<KeptBlock> kept)
    {
        if (Timm) return "timm layout (fused attn.qkv): stock transformers ViT classes read the vit./deit. layout";
        if (Config.HeadsPerLayer.Any(h => h != Config.Heads))
            return "the source was already pruned: pruned_heads names head indices of this checkpoint, not of the original";
        if (kept.Select(k => k.Groups[1].Length).Distinct().Count() > 1) return "MLP widths differ across layers (stock ViT has one intermediate_size); load the --export-padded copy";
        return null;
    }

    public JsonObject PaddedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        foreach (var k in new[] { "pruned", "intermediate_sizes", "num_heads_per_layer", "pruned_heads" }) cfg.Remove(k);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    public long ParameterCount()
    {
        long n = _outer.Values.Sum(t => t.numel());
        for (int i = 0; i < Config.Layers; i++) n += BlockParameters(Config.HeadsPerLayer[i], Config.IntermediateSizes[i]);
        return n;
    }

    public long BlockParameters(int heads, int mlp) => VitBlock.ParameterCount((long)heads * Config.HeadDim, mlp, Config.Hidden);

    public int Classes => (int)Outer(OuterRole.HeadW).shape[0];
    public int Channels => Config.Channels;
    public int ImageSize => Config.ImageSize;

    /// <summary>The loaded outer tensors and every block tensor of the layout (timm: the fused qkv).</summary>
    IEnumerable<(string Name, long[] Shape)> ExpectedTensors()
    {
        var c = Config;
        foreach (var (name, t) in _outer) yield return (name, t.shape);
        var names = VitBlock.LocalNames(Timm);
        for (int i = 0; i < c.Layers; i++)
        {
            long a = (long)c.HeadsPerLayer[i] * c.HeadDim;
            string prefix = Timm ? $"blocks.{i}." : $"{_p}encoder.layer.{i}.";
            var shapes = VitBlock.Shapes(a, c.IntermediateSizes[i], c.Hidden);
            for (int k = 0; k < names.Length; k++)
                if (!names[k].StartsWith(VitBlock.QkvPart)) yield return (prefix + names[k], shapes[k]);
            if (Timm)
            {
                yield return (prefix + "attn.qkv.weight", new[] { 3 * a, c.Hidden });
                yield return (prefix + "attn.qkv.bias", new[] { 3 * a });
            }
        }
    }

    public JsonObject Describe()
    {
        var c = Config;
        return new JsonObject
        {
            ["family"] = c.ModelType,
            ["layout"] = Timm ? "timm" : "hf",
            ["distilled"] = Distilled,
            ["dtype"] = SafeDTypes.ConfigName(StoredDType),
            ["parameters"] = ParameterCount(),
            ["pruned"] = c.Pruned,
            ["layers"] = c.Layers, ["hidden_size"] = c.Hidden, ["head_dim"] = c.HeadDim,
            ["image_size"] = c.ImageSize, ["patch_size"] = c.PatchSize, ["layer_norm_eps"] = c.LayerNormEps,
            ["per_layer"] = new JsonArray(Enumerable.Range(0, c.Layers).Select(i => (JsonNode)new JsonObject
            {
                ["heads"] = c.HeadsPerLayer[i], ["intermediate_size"] = c.IntermediateSizes[i],
                ["parameters"] = BlockParameters(c.HeadsPerLayer[i], c.IntermediateSizes[i]),
            }).ToArray()),
        };
    }

    public override void Dispose()
    {
        _outer.Clear();
        base.Dispose();
    }
}
