using System.Text.Json.Nodes;
using LlmSnp.Checkpoint;
using LlmSnp.Data;
using LlmSnp.Pruning;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LlmSnp.Models;

/// <summary>
/// OPT (HF `modeling_opt` semantics, models.md §2), streamed: the embeddings and head stay loaded,
/// each decoder block is read from the checkpoint when it is needed and released after.
/// </summary>
public sealed class OptModel : StreamedModel, ILanguageModel
{
    public const double LayerNormEps = 1e-5;
    public string Family => "opt";
    public OptConfig Config { get; }
    public int BlockCount => Config.Layers;
    /// <summary>"model.decoder." or "decoder." — both exist in the wild.</summary>
    public string Prefix { get; }

    readonly Tensor _embedTokens, _embedPositions;
    readonly Tensor? _projectIn, _projectOut, _finalLnW, _finalLnB, _lmHead;

    public OptModel(string modelDir, Device? device = null, ScalarType computeDType = ScalarType.Float32)
        : this(modelDir, OptConfig.From(ConfigFile.Load(modelDir)), device, computeDType) { }

    /// <summary>The config is read first: its errors come before the weights are opened.</summary>
    OptModel(string modelDir, OptConfig config, Device? device, ScalarType computeDType)
        : base(modelDir, device, computeDType, "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "generation_config.json")
    {
        Config = config;
        try
        {
            // The positions name the prefix too: a tied embedding may be stored only as lm_head.weight.
            Prefix = Checkpoint.Has("model.decoder.embed_tokens.weight") || Checkpoint.Has("model.decoder.embed_positions.weight") ? "model.decoder."
                : Checkpoint.Has("decoder.embed_tokens.weight") || Checkpoint.Has("decoder.embed_positions.weight") ? "decoder."
                : throw new LlmSnpException($"{modelDir}: no OPT embedding tensor (model.decoder.embed_tokens.weight or decoder.embed_tokens.weight)");
            var c = Config;
            if (!Checkpoint.TieHead(Prefix + "embed_tokens.weight", "lm_head.weight", c.TieWordEmbeddings) && c.TieWordEmbeddings) c.Untie();
            StoredDType = SafeDTypes.ToTorch(Checkpoint.Entry(Prefix + "embed_tokens.weight").DType);
            UnusedTensors = CheckpointLayout.Check(Checkpoint, modelDir, c.Layers, ExpectedTensors(), new[] { "lm_head.weight" });
            // The token embedding (and an untied head) stay in the stored dtype: rows are converted as they
            // are looked up, the head once on first use, so pruning never holds an F32 copy of the vocabulary.
            _embedTokens = ReadStored(Prefix + "embed_tokens.weight", c.VocabSize, c.WordEmbedProjDim);
            _embedPositions = Load("embed_positions.weight", c.MaxPositions + 2, c.Hidden);
            if (c.WordEmbedProjDim != c.Hidden)
            {
                _projectIn = Load("project_in.weight", c.Hidden, c.WordEmbedProjDim);
                _projectOut = Load("project_out.weight", c.WordEmbedProjDim, c.Hidden);
            }
            if (c.PreLayerNorm)
            {
                _finalLnW = Load("final_layer_norm.weight", c.Hidden);
                _finalLnB = Load("final_layer_norm.bias", c.Hidden);
            }
            if (!c.TieWordEmbeddings) _lmHead = ReadStored("lm_head.weight", c.VocabSize, c.WordEmbedProjDim);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    Tensor Load(string name, params long[] shape) => Resident(Read(Prefix + name, shape));

    internal Tensor Read(string fullName, params long[] shape) => ReadAs(fullName, ComputeDType, shape);

    Tensor ReadStored(string fullName, params long[] shape) => Resident(ReadAs(fullName, StoredDType, shape));

    Tensor? _headCompute;
    Tensor HeadWeight => _headCompute ??= Resident((_lmHead ?? _embedTokens).to(ComputeDType).DetachFromDisposeScope());

    /// <summary>Token ids [batch, tokens] → hidden states [batch, tokens, hidden], positions from 0.</summary>
    public Tensor Embed(Tensor ids) => EmbedAt(ids, 0);

    /// <summary>The same for tokens at positions start..start+t-1 (a continued sequence: generation with a KV cache).</summary>
    public Tensor EmbedAt(Tensor ids, int startPosition)
    {
        CheckTokens(ids, startPosition, Config.MaxPositions, Config.VocabSize);
        using var scope = NewDisposeScope();
        long b = ids.shape[0], t = ids.shape[1];
        var h = _embedTokens.index_select(0, ids.reshape(-1).to(Device)).to(ComputeDType).view(b, t, -1);
        if (_projectIn is not null) h = F.linear(h, _projectIn);
        h = h + _embedPositions.narrow(0, 2 + startPosition, t).unsqueeze(0);   // learned positions with offset 2
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>Packed rows: each token's learned position embedding from its own position [batch, t] (offset 2, as HF).</summary>
    public Tensor EmbedAt(Tensor ids, Tensor positions)
    {
        using var scope = NewDisposeScope();
        long b = ids.shape[0], t = ids.shape[1];
        CheckPackedTokens(ids, positions, Config.MaxPositions, Config.VocabSize);
        var h = _embedTokens.index_select(0, ids.reshape(-1).to(Device)).to(ComputeDType).view(b, t, -1);
        if (_projectIn is not null) h = F.linear(h, _projectIn);
        h = h + _embedPositions.index_select(0, (positions.reshape(-1) + 2).to(Device)).view(b, t, -1);
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>Hidden states after the last block → logits [batch, tokens, vocab].</summary>
    public Tensor Head(Tensor h)
    {
        using var scope = NewDisposeScope();
        if (_finalLnW is not null) h = F.layer_norm(h, new long[] { Config.Hidden }, _finalLnW, _finalLnB, LayerNormEps);
        if (_projectOut is not null) h = F.linear(h, _projectOut);
        var logits = F.linear(h, HeadWeight);
        return logits.MoveToOuterDisposeScope();
    }

    /// <summary>Reads decoder layer i onto the device (the only block resident while it is in use).</summary>
    public OptBlock LoadBlock(int i)
    {
        var c = Config;
        var shapes = OptBlock.Shapes((long)c.HeadsPerLayer[i] * c.HeadDim, c.FfnDims[i], c.Hidden);
        string prefix = $"{Prefix}layers.{i}.";
        var w = PrunableBlock.ReadAll(w => { for (int k = 0; k < OptBlock.Names.Length; k++) w[prefix + OptBlock.Names[k]] = Read(prefix + OptBlock.Names[k], shapes[k]); });
        return new OptBlock(prefix, c.Hidden, c.HeadDim, c.PreLayerNorm, i, w) { Recycler = Checkpoint.Recycle };
    }

    IPrunableBlock IPrunableModel.LoadBlock(int index) => LoadBlock(index);

    ICachedBlock ILanguageModel.LoadCachedBlock(int index) => LoadBlock(index);

    /// <summary>Full forward with every block loaded at once (reference path for tests).</summary>
    public Tensor ForwardAllInMemory(Tensor ids)
    {
        var blocks = Enumerable.Range(0, BlockCount).Select(LoadBlock).ToList();
        try
        {
            using var scope = NewDisposeScope();
            var h = Embed(ids);
            foreach (var b in blocks) h = b.Forward(h)!;
            return Head(h).MoveToOuterDisposeScope();
        }
        finally { blocks.ForEach(b => b.Dispose()); }
    }

    public IEnumerable<(string Name, Tensor Tensor)> OuterTensors(ScalarType dtype)
    {
        yield return (Prefix + "embed_tokens.weight", _embedTokens.to(dtype));
        yield return (Prefix + "embed_positions.weight", _embedPositions.to(dtype));
        if (_projectIn is not null) yield return (Prefix + "project_in.weight", _projectIn.to(dtype));
        if (_projectOut is not null) yield return (Prefix + "project_out.weight", _projectOut.to(dtype));
        if (_finalLnW is not null)
        {
            yield return (Prefix + "final_layer_norm.weight", _finalLnW.to(dtype));
            yield return (Prefix + "final_layer_norm.bias", _finalLnB!.to(dtype));
        }
        if (_lmHead is not null) yield return ("lm_head.weight", _lmHead.to(dtype));
    }

    public JsonObject PrunedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        cfg["pruned"] = true;
        cfg["ffn_dims"] = new JsonArray(kept.Select(k => (JsonNode)k.Groups[1].Length).ToArray());
        cfg["num_heads_per_layer"] = new JsonArray(kept.Select(k => (JsonNode)k.Groups[0].Length).ToArray());
        // One width for every layer goes in the stock field, so stock OPT builds the stored fc1/fc2 from the config alone.
        // Heads stay as they are: stock OPT's attention width is hidden_size, so removed heads cannot be expressed (NotStockLoadable).
        var ffn = kept.Select(k => k.Groups[1].Length).Distinct().ToArray();
        if (ffn.Length == 1) cfg["ffn_dim"] = ffn[0];
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    public string? NotStockLoadable(IReadOnlyList<KeptBlock> kept)
    {
        var headless = Enumerable.Range(0, kept.Count).Where(l => kept[l].Groups[0].Length != Config.Heads).ToArray();
        if (headless.Length > 0)
            return $"heads removed in layers [{string.Join(", ", headless)}]: stock OPT's attention width is hidden_size; load the --export-padded copy";
        if (kept.Select(k => k.Groups[1].Length).Distinct().Count() > 1) return "fc1 widths differ across layers (stock OPT has one ffn_dim); load the --export-padded copy";
        return null;
    }

    public JsonObject PaddedConfig(IReadOnlyList<KeptBlock> kept, ScalarType dtype)
    {
        var cfg = (JsonObject)Config.File.Json.DeepClone();
        foreach (var k in new[] { "pruned", "ffn_dims", "num_heads_per_layer" }) cfg.Remove(k);
        cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
        return cfg;
    }

    /// <summary>Parameter count of the model as configured (per-layer widths honoured).</summary>
    public long ParameterCount()
    {
        var c = Config;
        long n = (long)c.VocabSize * c.WordEmbedProjDim + (long)(c.MaxPositions + 2) * c.Hidden;
        if (c.WordEmbedProjDim != c.Hidden) n += 2L * c.Hidden * c.WordEmbedProjDim;
        if (c.PreLayerNorm) n += 2L * c.Hidden;
        if (!c.TieWordEmbeddings) n += (long)c.VocabSize * c.WordEmbedProjDim;
        for (int i = 0; i < c.Layers; i++) n += BlockParameters(c.HeadsPerLayer[i], c.FfnDims[i]);
        return n;
    }

    public long BlockParameters(int heads, int ffn) => OptBlock.ParameterCount((long)heads * Config.HeadDim, ffn, Config.Hidden);

    public int MaxPositions => Config.MaxPositions;
    public int VocabSize => Config.VocabSize;

    public ITextTokenizer Tokenizer() => TextTokenizers.ForModel(ModelDir);

    /// <summary>Every tensor the config says the checkpoint holds, with its shape.</summary>
    IEnumerable<(string Name, long[] Shape)> ExpectedTensors()
    {
        var c = Config;
        yield return (Prefix + "embed_tokens.weight", new long[] { c.VocabSize, c.WordEmbedProjDim });
        yield return (Prefix + "embed_positions.weight", new long[] { c.MaxPositions + 2, c.Hidden });
        if (c.WordEmbedProjDim != c.Hidden)
        {
            yield return (Prefix + "project_in.weight", new long[] { c.Hidden, c.WordEmbedProjDim });
            yield return (Prefix + "project_out.weight", new long[] { c.WordEmbedProjDim, c.Hidden });
        }
        if (c.PreLayerNorm)
        {
            yield return (Prefix + "final_layer_norm.weight", new long[] { c.Hidden });
            yield return (Prefix + "final_layer_norm.bias", new long[] { c.Hidden });
        }
        if (!c.TieWordEmbeddings) yield return ("lm_head.weight", new long[] { c.VocabSize, c.WordEmbedProjDim });
        for (int i = 0; i < c.Layers; i++)
        {
            var shapes = OptBlock.Shapes((long)c.HeadsPerLayer[i] * c.HeadDim, c.FfnDims[i], c.Hidden);
            for (int k = 0; k < OptBlock.Names.Length; k++) yield return ($"{Prefix}layers.{i}.{OptBlock.Names[k]}", shapes[k]);
        }
    }

    public JsonObject Describe()
    {
        var c = Config;
        return new JsonObject
        {
            ["family"] = Family,
            ["dtype"] = SafeDTypes.ConfigName(StoredDType),
            ["parameters"] = ParameterCount(),
            ["pruned"] = c.Pruned,
            ["layers"] = c.Layers, ["hidden_size"] = c.Hidden, ["head_dim"] = c.HeadDim,
            ["vocab_size"] = c.VocabSize, ["max_position_embeddings"] = c.MaxPositions,
            ["layer_norm"] = c.PreLayerNorm ? "pre" : "post",
            ["word_embed_proj_dim"] = c.WordEmbedProjDim, ["tie_word_embeddings"] = c.TieWordEmbeddings,
            ["tensor_prefix"] = Prefix,
            ["per_layer"] = new JsonArray(Enumerable.Range(0, c.Layers).Select(i => (JsonNode)new JsonObject
            {
                ["heads"] = c.HeadsPerLayer[i], ["ffn_dim"] = c.FfnDims[i],
                ["parameters"] = BlockParameters(c.HeadsPerLayer[i], c.FfnDims[i]),
            }).ToArray()),
        };
    }
}
