namespace LlmSnp.Data.Images;

/// <summary>An 8-bit RGB image: <see cref="Pixels"/> holds Height rows of Width pixels, R, G, B each (HWC).</summary>
public sealed class RgbImage
{
    public int Width { get; }
    public int Height { get; }
    public byte[] Pixels { get; }

    public RgbImage(int width, int height, byte[] pixels)
    {
        ArgumentNullException.ThrowIfNull(pixels);
        if (width <= 0 || height <= 0) throw new ArgumentOutOfRangeException(nameof(width), $"image size {width}x{height} must be positive");
        if (pixels.Length != (long)width * height * 3)
            throw new ArgumentException($"{pixels.Length} bytes do not make a {width}x{height} RGB image ({(long)width * height * 3} expected)", nameof(pixels));
        Width = width;
        Height = height;
        Pixels = pixels;
    }

    public override string ToString() => $"RgbImage {Width}x{Height}";
}
