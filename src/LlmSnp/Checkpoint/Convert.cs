using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

/// <summary>`llmsnp convert`: rewrite a checkpoint's floating-point tensors in another dtype.</summary>
public static class CheckpointConvert
{
    public static JsonObject Run(string modelDir, string outDir, ScalarType dtype)
    {
        using var reader = new CheckpointReader(modelDir);
        string full = Path.GetFullPath(outDir);
        if (Directory.Exists(full)) throw new LlmSnpException($"{outDir}: already exists");
        // A hidden staging sibling like prune's: a signal or a later run can clean it up.
        string parent = Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(parent);
        string tmp = StagingDirectory.Create(parent, Path.GetFileName(full), null);
        try
        {
            using (var w = new SafeTensorsWriter(tmp))
            {
                foreach (var name in reader.Names.OrderBy(n => n, StringComparer.Ordinal))
                {
                    var stored = SafeDTypes.ToTorch(reader.Entry(name).DType);
                    using var t = reader.Read(name, stored.IsFloatingPoint() ? dtype : stored, CPU);
                    w.Add(name, t);
                }
                w.Finish();
            }
            foreach (var f in Directory.GetFiles(modelDir))
            {
                string n = Path.GetFileName(f);
                if (n.EndsWith(".safetensors") || n == SafeTensorsWriter.IndexFileName) continue;
                if (n == "config.json")
                {
                    var cfg = JsonNode.Parse(File.ReadAllText(f))!.AsObject();
                    cfg["torch_dtype"] = SafeDTypes.ConfigName(dtype);
                    File.WriteAllText(Path.Combine(tmp, n), cfg.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
                }
                else File.Copy(f, Path.Combine(tmp, n));
            }
            Directory.Move(tmp, full);
        }
        catch
        {
            if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
            throw;
        }
        finally { StagingDirectory.Release(tmp); }
        return new JsonObject { ["model"] = modelDir, ["out"] = outDir, ["dtype"] = SafeDTypes.ConfigName(dtype) };
    }
}
