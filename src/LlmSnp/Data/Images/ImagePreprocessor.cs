using static TorchSharp.torch;

namespace LlmSnp.Data.Images;

/// <summary>
/// The eval transform of HF ViT/DeiT processors and timm: resize (Pillow bicubic), center crop,
/// rescale, normalize, to CHW float32.
/// </summary>
public static class ImagePreprocessor
{
    /// <summary>Preprocesses one image to a CHW float32 array (3 x out height x out width, see <see cref="OutputSize"/>).</summary>
    public static float[] ToChw(RgbImage img, PreprocessConfig cfg)
    {
        ArgumentNullException.ThrowIfNull(img);
        ArgumentNullException.ThrowIfNull(cfg);
        if (cfg.DoNormalize && (cfg.Mean is not { Length: 3 } || cfg.Std is not { Length: 3 }))
            throw new LlmSnpException("preprocess config: image_mean and image_std need 3 values each");

        if (cfg.DoResize)
        {
            var (w, h) = ResizedSize(img.Width, img.Height, cfg);
            if (w != img.Width || h != img.Height) img = PilResize.Bicubic(img, w, h);
        }
        int srcW = img.Width, srcH = img.Height;
        int outH = srcH, outW = srcW, top = 0, left = 0;
        if (cfg.DoCenterCrop)
        {
            if (cfg.CropHeight <= 0 || cfg.CropWidth <= 0)
                throw new LlmSnpException($"preprocess config: crop_size {cfg.CropHeight}x{cfg.CropWidth} must be positive");
            outH = cfg.CropHeight;
            outW = cfg.CropWidth;
            top = CropOffset(srcH, outH);
            left = CropOffset(srcW, outW);
        }

        // value(c, byte) once per channel: 768 floats instead of per-pixel arithmetic.
        Span<float> table = stackalloc float[3 * 256];
        for (int c = 0; c < 3; c++)
            for (int v = 0; v < 256; v++)
            {
                double x = v;
                if (cfg.DoRescale) x *= cfg.RescaleFactor;
                if (cfg.DoNormalize) x = (x - cfg.Mean[c]) / cfg.Std[c];
                table[c * 256 + v] = (float)x;
            }

        var outArr = new float[3 * outH * outW];
        byte[] px = img.Pixels;
        int plane = outH * outW;
        for (int y = 0; y < outH; y++)
        {
            int sy = y + top;
            bool rowIn = sy >= 0 && sy < srcH;
            for (int x = 0; x < outW; x++)
            {
                int sx = x + left, o = y * outW + x;
                if (rowIn && sx >= 0 && sx < srcW)
                {
                    int p = (sy * srcW + sx) * 3;
                    outArr[o] = table[px[p]];
                    outArr[plane + o] = table[256 + px[p + 1]];
                    outArr[2 * plane + o] = table[512 + px[p + 2]];
                }
                else
                {   // crop larger than the image: zero padding, as torchvision's center_crop
                    outArr[o] = table[0];
                    outArr[plane + o] = table[256];
                    outArr[2 * plane + o] = table[512];
                }
            }
        }
        return outArr;
    }

    /// <summary>The (height, width) that <see cref="ToChw"/> produces for a <paramref name="width"/> x <paramref name="height"/> image.</summary>
    public static (int Height, int Width) OutputSize(int width, int height, PreprocessConfig cfg)
    {
        if (cfg.DoCenterCrop) return (cfg.CropHeight, cfg.CropWidth);
        if (!cfg.DoResize) return (height, width);
        var (w, h) = ResizedSize(width, height, cfg);
        return (h, w);
    }

    /// <summary>Resize target (width, height): shorter side to ShortestEdge with the longer side int(N * long / short)
    /// (torchvision / timm / HF get_resize_output_image_size truncate), or exactly ResizeHeight x ResizeWidth.</summary>
    public static (int Width, int Height) ResizedSize(int width, int height, PreprocessConfig cfg)
    {
        if (cfg.ShortestEdge is int n)
        {
            if (n <= 0) throw new LlmSnpException($"preprocess config: size.shortest_edge {n} must be positive");
            bool wide = width > height;
            int shortSide = wide ? height : width, longSide = wide ? width : height;
            int newLong = (int)((double)((long)n * longSide) / shortSide);
            return wide ? (newLong, n) : (n, newLong);
        }
        if (cfg.ResizeHeight is int h && cfg.ResizeWidth is int w)
        {
            if (h <= 0 || w <= 0) throw new LlmSnpException($"preprocess config: size {h}x{w} must be positive");
            return (w, h);
        }
        throw new LlmSnpException("preprocess config: do_resize needs size (shortest_edge, or height and width)");
    }

    /// <summary>torchvision CenterCrop's offset: int(round((size - crop) / 2.0)) with Python's half-to-even round;
    /// where the crop is larger, torchvision pads (crop - size) // 2 on the leading side first.</summary>
    /// <remarks>HF's image_transforms.center_crop floors instead ((size - crop) // 2): the two differ by one
    /// pixel where size - crop ≡ 3 (mod 4).</remarks>
    public static int CropOffset(int size, int crop)
    {
        if (crop > size) return -((crop - size) / 2);
        return (int)Math.Round((size - crop) / 2.0, MidpointRounding.ToEven);
    }

    /// <summary>Stacks CHW arrays of 3 x <paramref name="height"/> x <paramref name="width"/> into a [B, 3, H, W] float32 tensor.</summary>
    public static Tensor Batch(IReadOnlyList<float[]> chw, int height, int width)
    {
        ArgumentNullException.ThrowIfNull(chw);
        if (height <= 0 || width <= 0) throw new ArgumentOutOfRangeException(nameof(height), $"batch image size {height}x{width} must be positive");
        int n = 3 * height * width;
        if (chw.Count == 0) return torch.empty(0, 3, height, width, ScalarType.Float32);
        var all = new float[(long)chw.Count * n];
        for (int i = 0; i < chw.Count; i++)
        {
            var a = chw[i] ?? throw new ArgumentNullException(nameof(chw), $"image {i} is null");
            if (a.Length != n) throw new ArgumentException($"image {i} has {a.Length} values, expected 3x{height}x{width} = {n}", nameof(chw));
            Array.Copy(a, 0, all, (long)i * n, n);
        }
        return torch.tensor(all, new long[] { chw.Count, 3, height, width });
    }
}
