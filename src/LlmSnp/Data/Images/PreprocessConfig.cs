using System.Text.Json;

namespace LlmSnp.Data.Images;

/// <summary>
/// An HF image processor's preprocessing settings (ViTImageProcessor / DeiTImageProcessor style
/// <c>preprocessor_config.json</c>). Resize is either the shorter side to <see cref="ShortestEdge"/>
/// (aspect kept) or to exactly <see cref="ResizeHeight"/> x <see cref="ResizeWidth"/>; always Pillow bicubic.
/// </summary>
public sealed record PreprocessConfig(
    bool DoResize, int? ShortestEdge, int? ResizeHeight, int? ResizeWidth,
    bool DoCenterCrop, int CropHeight, int CropWidth,
    bool DoRescale, double RescaleFactor,
    bool DoNormalize, float[] Mean, float[] Std)
{
    public const string FileName = "preprocessor_config.json";

    /// <summary>HF ViTImageProcessor's defaults (with bicubic resampling): 224x224, no crop, x/255, mean = std = 0.5.</summary>
    public static PreprocessConfig Default => new(
        DoResize: true, ShortestEdge: null, ResizeHeight: 224, ResizeWidth: 224,
        DoCenterCrop: false, CropHeight: 224, CropWidth: 224,
        DoRescale: true, RescaleFactor: 1.0 / 255.0,
        DoNormalize: true, Mean: [0.5f, 0.5f, 0.5f], Std: [0.5f, 0.5f, 0.5f]);

    /// <summary>Reads <c>modelDir/preprocessor_config.json</c>; a missing file gives <see cref="Default"/>.</summary>
    /// <remarks>
    /// <c>size</c> may be <c>{"shortest_edge": N}</c>, <c>{"height": H, "width": W}</c> or an int N (N x N, as HF's
    /// get_size_dict does for these processors); <c>crop_size</c> likewise {"height","width"} or an int.
    /// <c>resample</c>, where given, must be 3 (bicubic). <c>do_center_crop</c> defaults to whether
    /// <c>crop_size</c> is given. <c>crop_pct</c> and other keys are ignored.
    /// </remarks>
    public static PreprocessConfig Load(string modelDir)
    {
        string path = Path.Combine(modelDir, FileName);
        if (!File.Exists(path)) return Default;
        JsonDocument doc;
        try { doc = JsonDocument.Parse(File.ReadAllText(path), new JsonDocumentOptions { AllowTrailingCommas = true, CommentHandling = JsonCommentHandling.Skip }); }
        catch (JsonException e) { throw new LlmSnpException($"{path}: invalid JSON ({e.Message.Split('\n')[0]})", e); }
        catch (IOException e) { throw new LlmSnpException($"{path}: cannot read ({e.Message})", e); }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new LlmSnpException($"{path}: expected a JSON object");
            var d = Default;

            if (root.TryGetProperty("resample", out var rs) && rs.ValueKind != JsonValueKind.Null)
            {
                if (rs.ValueKind != JsonValueKind.Number || !rs.TryGetInt32(out int r) || r != 3)
                    throw new LlmSnpException($"{path}: field \"resample\" is {rs.GetRawText()}; only 3 (bicubic) is supported");
            }

            bool doResize = Bool(root, "do_resize", d.DoResize, path);
            int? shortest = null, rh = d.ResizeHeight, rw = d.ResizeWidth;
            if (root.TryGetProperty("size", out var size) && size.ValueKind != JsonValueKind.Null)
            {
                rh = rw = null;
                if (size.ValueKind == JsonValueKind.Number) rh = rw = Positive(size, "size", path);
                else if (size.ValueKind == JsonValueKind.Object)
                {
                    if (size.TryGetProperty("shortest_edge", out var se))
                    {
                        shortest = Positive(se, "size.shortest_edge", path);
                        if (size.TryGetProperty("longest_edge", out var le) && le.ValueKind != JsonValueKind.Null)
                            throw new LlmSnpException($"{path}: field \"size.longest_edge\" is not supported");
                    }
                    else if (size.TryGetProperty("height", out var h) && size.TryGetProperty("width", out var w))
                    {
                        rh = Positive(h, "size.height", path);
                        rw = Positive(w, "size.width", path);
                    }
                    else throw new LlmSnpException($"{path}: field \"size\" needs \"shortest_edge\" or \"height\" and \"width\"");
                }
                else throw new LlmSnpException($"{path}: field \"size\" must be an int or an object");
            }

            bool hasCrop = root.TryGetProperty("crop_size", out var crop) && crop.ValueKind != JsonValueKind.Null;
            bool doCrop = Bool(root, "do_center_crop", hasCrop, path);
            int ch = d.CropHeight, cw = d.CropWidth;
            if (hasCrop)
            {
                if (crop.ValueKind == JsonValueKind.Number) ch = cw = Positive(crop, "crop_size", path);
                else if (crop.ValueKind == JsonValueKind.Object && crop.TryGetProperty("height", out var h) && crop.TryGetProperty("width", out var w))
                {
                    ch = Positive(h, "crop_size.height", path);
                    cw = Positive(w, "crop_size.width", path);
                }
                else throw new LlmSnpException($"{path}: field \"crop_size\" must be an int or {{\"height\", \"width\"}}");
            }
            else if (doCrop) throw new LlmSnpException($"{path}: field \"crop_size\" is missing but do_center_crop is true");

            bool doRescale = Bool(root, "do_rescale", d.DoRescale, path);
            double factor = d.RescaleFactor;
            if (root.TryGetProperty("rescale_factor", out var rf) && rf.ValueKind != JsonValueKind.Null)
            {
                if (rf.ValueKind != JsonValueKind.Number || !double.IsFinite(factor = rf.GetDouble()) || factor <= 0)
                    throw new LlmSnpException($"{path}: field \"rescale_factor\" must be a positive number");
            }

            bool doNormalize = Bool(root, "do_normalize", d.DoNormalize, path);
            float[] mean = Triple(root, "image_mean", d.Mean, path, allowZero: true);
            float[] std = Triple(root, "image_std", d.Std, path, allowZero: false);

            return new PreprocessConfig(doResize, shortest, rh, rw, doCrop, ch, cw, doRescale, factor, doNormalize, mean, std);
        }
    }

    static bool Bool(JsonElement root, string name, bool dflt, string path)
    {
        if (!root.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null) return dflt;
        return v.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw new LlmSnpException($"{path}: field \"{name}\" must be true or false"),
        };
    }

    static int Positive(JsonElement v, string name, string path)
    {
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt32(out int n) || n <= 0 || n > 65536)
            throw new LlmSnpException($"{path}: field \"{name}\" must be a positive int (got {v.GetRawText()})");
        return n;
    }

    static float[] Triple(JsonElement root, string name, float[] dflt, string path, bool allowZero)
    {
        if (!root.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null) return (float[])dflt.Clone();
        var r = new float[3];
        if (v.ValueKind == JsonValueKind.Number) r[0] = r[1] = r[2] = v.GetSingle();   // a scalar applies to all channels
        else if (v.ValueKind == JsonValueKind.Array && v.GetArrayLength() == 3)
        {
            int i = 0;
            foreach (var e in v.EnumerateArray())
            {
                if (e.ValueKind != JsonValueKind.Number) throw new LlmSnpException($"{path}: field \"{name}\" must hold 3 numbers");
                r[i++] = e.GetSingle();
            }
        }
        else throw new LlmSnpException($"{path}: field \"{name}\" must be a list of 3 numbers");
        foreach (float x in r)
            if (!float.IsFinite(x) || (!allowZero && x == 0))
                throw new LlmSnpException($"{path}: field \"{name}\" has a {(float.IsFinite(x) ? "zero" : "non-finite")} value");
        return r;
    }
}
