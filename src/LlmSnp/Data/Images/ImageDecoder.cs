using SkiaSharp;

namespace LlmSnp.Data.Images;

/// <summary>Decodes an image file (JPEG, PNG, WebP, GIF, BMP... whatever Skia reads) to 8-bit RGB.</summary>
/// <remarks>
/// Matches PIL's <c>Image.open(path).convert("RGB")</c> in what it does not do: no EXIF rotation, no ICC
/// colour conversion, alpha dropped without compositing (unpremultiplied colours kept). Grayscale and
/// palette images come out with the grey or palette colour in all three channels; CMYK JPEGs are
/// converted by Skia. JPEG pixels may differ from libjpeg's by a level or two where the IDCT/upsampling
/// differ; lossless formats (PNG) decode identically.
/// </remarks>
public static class ImageDecoder
{
    public static RgbImage Decode(string path)
    {
        byte[] data;
        try { data = File.ReadAllBytes(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or NotSupportedException)
        {
            throw new LlmSnpException($"{path}: cannot decode image ({OneLine(e.Message)})", e);
        }
        return Decode(data, path);
    }

    /// <summary>Decodes an in-memory encoded image; <paramref name="name"/> names it in errors.</summary>
    public static RgbImage Decode(byte[] data, string name)
    {
        ArgumentNullException.ThrowIfNull(data);
        if (data.Length == 0) throw new LlmSnpException($"{name}: cannot decode image (empty file)");
        using var stream = new MemoryStream(data, writable: false);
        using var codec = SKCodec.Create(stream, out SKCodecResult created);
        if (codec == null)
            throw new LlmSnpException($"{name}: cannot decode image ({(created == SKCodecResult.Success ? "unrecognised format" : created.ToString())})");
        int w = codec.Info.Width, h = codec.Info.Height;
        if (w <= 0 || h <= 0 || (long)w * h > 1L << 28)
            throw new LlmSnpException($"{name}: cannot decode image (unsupported size {w}x{h})");
        // Colour space null: no colour management (PIL ignores embedded profiles); unpremultiplied alpha.
        var info = new SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        var rgba = new byte[info.BytesSize];
        SKCodecResult r = codec.GetPixels(info, rgba);
        if (r != SKCodecResult.Success)
            throw new LlmSnpException($"{name}: cannot decode image ({r})");
        var rgb = new byte[w * h * 3];
        for (int i = 0, j = 0; j < rgb.Length; i += 4, j += 3)
        {
            rgb[j] = rgba[i];
            rgb[j + 1] = rgba[i + 1];
            rgb[j + 2] = rgba[i + 2];
        }
        return new RgbImage(w, h, rgb);
    }

    static string OneLine(string s) => s.Replace('\r', ' ').Replace('\n', ' ');
}
