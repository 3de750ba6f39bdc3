using System.Text.Json.Nodes;
using LlmSnp.Models;
using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

/// <summary>`llmsnp convert`: rewrite a checkpoint's floating-point tensors in another dtype.</summary>
public static class CheckpointConvert
{
    /// <summary>The dtypes `convert --to` writes.</summary>
    public static ScalarType ParseTarget(string s, string option = "--to") => SafeDTypes.ParseOption(s, option);

    public static JsonObject Run(string modelDir, string outDir, ScalarType dtype)
    {
        // config.json is read (strictly: a malformed one is an error naming it) before anything is written.
        var cfg = ConfigFile.Load(modelDir);
        using var reader = new CheckpointReader(modelDir);
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
                    w.Add(name, stored.IsFloatingPoint() ? FiniteCast.To(t, dtype, modelDir, name, remedy) : t);
                }
                w.Finish();
            }
            foreach (var f in Directory.GetFiles(modelDir))
            {
                string n = Path.GetFileName(f);
                if (n.EndsWith(".safetensors") || n == SafeTensorsWriter.IndexFileName) continue;
                if (n == "config.json")
                {
                    var json = cfg.Json.DeepClone().AsObject();
                    json["torch_dtype"] = SafeDTypes.ConfigName(dtype);
                    AtomicFile.WriteAllText(Path.Combine(tmp, n), json.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
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
        return new JsonObject { ["model"] = modelDir, ["out"] = outDir, ["dtype"] = SafeDTypes.ConfigName(dtype) };
    }
}
