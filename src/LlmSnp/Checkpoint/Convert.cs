using System.Text.Json.Nodes;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

/// <summary>
/// `llmsnp convert`: rewrite a checkpoint as safetensors, its floating-point tensors in another dtype or as
/// stored (a `pytorch_model.bin` checkpoint becomes the same tensors in `model.safetensors`, bit for bit).
/// </summary>
public static class CheckpointConvert
{
    /// <summary>The dtypes `convert --to` writes; errors name --to.</summary>
    public static ScalarType ParseTarget(string s, string option = "--to") => SafeDTypes.ParseOption(s, option);

    /// <param name="dtype">The floating-point dtype to write; null keeps each tensor's stored dtype.</param>
    public static JsonObject Run(string modelDir, string outDir, ScalarType? dtype)
    {
        using var reader = new CheckpointReader(modelDir);
        var config = File.Exists(Path.Combine(modelDir, "config.json")) ? Models.ConfigFile.Load(modelDir) : null;   // before anything is written: one line naming a broken one
        var weights = reader.WeightFiles.Select(Path.GetFileName).ToHashSet(StringComparer.Ordinal);
        string full = Path.GetFullPath(outDir);
        var existing = FileNodes.Kind(full);
        if (existing != FileNodeKind.Missing)
            throw new LlmSnpException($"{outDir}: already exists ({FileNodes.Describe(existing)}); remove it or give a new path");
        // A hidden staging sibling like prune's: a signal or a later run can clean it up.
        string parent = Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(parent);
        string tmp = StagingDirectory.Create(parent, Path.GetFileName(full), null);
        string remedy = dtype == ScalarType.Float16 ? "convert to bfloat16 or float32, which hold it" : "convert to float32, which holds it";
        try
        {
            using (var w = new SafeTensorsWriter(tmp))
            {
                foreach (var name in reader.Names.OrderBy(n => n, StringComparer.Ordinal))
                {
                    using var scope = NewDisposeScope();
                    var stored = SafeDTypes.ToTorch(reader.Entry(name).DType);
                    var t = reader.Read(name, stored, CPU);
                    // Cast through the one finiteness check export gguf uses: no +inf where the source was finite.
                    w.Add(name, stored.IsFloatingPoint() && dtype is ScalarType to ? FiniteCast.To(t, to, modelDir, name, remedy) : t);
                }
                w.Finish();
            }
            foreach (var f in Directory.GetFiles(modelDir))
            {
                string n = Path.GetFileName(f);
                // The weights are written anew; a .bin index would name files the output does not have.
                if (n.EndsWith(".safetensors") || weights.Contains(n) || n is SafeTensorsWriter.IndexFileName or PytorchBinFile.IndexFileName) continue;
                if (n == "config.json" && dtype is ScalarType d)
                {
                    var cfg = (JsonObject)config!.Json.DeepClone();
                    cfg["torch_dtype"] = SafeDTypes.ConfigName(d);
                    File.WriteAllText(Path.Combine(tmp, n), cfg.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
                }
                else File.Copy(f, Path.Combine(tmp, n));
            }
            StagingDirectory.Publish(() => Directory.Move(tmp, full));
        }
        catch (Exception e)
        {
            if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
            if (ResourceLimits.Explain(e) is string limit)
                throw new LlmSnpException($"{outDir}: writing the converted checkpoint failed ({limit}); nothing was written");
            throw;
        }
        finally { StagingDirectory.Release(tmp); }
        return new JsonObject
        {
            ["model"] = modelDir, ["out"] = outDir, ["from"] = reader.Format, ["to"] = "safetensors",
            ["dtype"] = dtype is ScalarType x ? SafeDTypes.ConfigName(x) : "as stored",
        };
    }
}
