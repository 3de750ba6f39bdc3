namespace LlmSnp.Data.Images;

/// <summary>
/// Pillow's <c>Image.resize((w, h), Image.BICUBIC)</c> for 8-bit RGB, bit for bit: a port of
/// src/libImaging/Resample.c (<c>precompute_coeffs</c>, <c>normalize_coeffs_8bpc</c>,
/// <c>ImagingResampleHorizontal_8bpc</c> / <c>Vertical_8bpc</c>, <c>ImagingResampleInner</c>).
/// </summary>
/// <remarks>
/// The bicubic kernel (a = -0.5, support 2) is widened by the scale factor when downscaling
/// (antialiasing). Coefficients are computed in double per output pixel, normalised to sum 1, then
/// rounded to 22-bit fixed point; sums start at half a unit and are clipped to 0..255 after the shift.
/// The horizontal pass runs first (only where the width changes) over the source rows the vertical
/// pass needs, into an 8-bit intermediate; the vertical pass runs only where the height changes.
/// Keep the arithmetic order as is: changing it changes bytes.
/// </remarks>
public static class PilResize
{
    const int PrecisionBits = 32 - 8 - 2;
    const double Support = 2.0;

    public static RgbImage Bicubic(RgbImage src, int width, int height)
    {
        ArgumentNullException.ThrowIfNull(src);
        if (width <= 0 || height <= 0) throw new ArgumentOutOfRangeException(nameof(width), $"resize target {width}x{height} must be positive");
        // Image.resize returns a copy when the size is unchanged.
        if (width == src.Width && height == src.Height) return new RgbImage(width, height, (byte[])src.Pixels.Clone());

        bool needHorizontal = width != src.Width, needVertical = height != src.Height;
        int ksizeH = PrecomputeCoeffs(src.Width, width, out int[] boundsH, out int[] kkH);
        int ksizeV = PrecomputeCoeffs(src.Height, height, out int[] boundsV, out int[] kkV);

        // First and one-past-last source rows the vertical pass reads.
        int yFirst = boundsV[0];
        int yLast = boundsV[height * 2 - 2] + boundsV[height * 2 - 1];

        byte[] cur = src.Pixels;
        int curW = src.Width;
        if (needHorizontal)
        {
            for (int i = 0; i < height; i++) boundsV[i * 2] -= yFirst;
            var tmp = new byte[(yLast - yFirst) * width * 3];
            Horizontal(src.Pixels, src.Width, yFirst, tmp, width, yLast - yFirst, ksizeH, boundsH, kkH);
            cur = tmp;
            curW = width;
        }
        if (needVertical)
        {
            var outPx = new byte[height * curW * 3];
            Vertical(cur, curW, outPx, height, ksizeV, boundsV, kkV);
            cur = outPx;
        }
        return new RgbImage(width, height, cur);
    }

    static double BicubicFilter(double x)
    {
        const double a = -0.5;
        if (x < 0.0) x = -x;
        if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
        if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
        return 0.0;
    }

    /// <summary>precompute_coeffs for the box (0, inSize) followed by normalize_coeffs_8bpc.</summary>
    static int PrecomputeCoeffs(int inSize, int outSize, out int[] bounds, out int[] kk)
    {
        // Pillow: (double)(in1 - in0) / outSize with float in0 = 0, in1 = inSize (exact below 2^24).
        double scale = (double)(float)inSize / outSize;
        double filterscale = scale < 1.0 ? 1.0 : scale;
        double support = Support * filterscale;
        int ksize = (int)Math.Ceiling(support) * 2 + 1;

        bounds = new int[outSize * 2];
        kk = new int[outSize * ksize];
        Span<double> k = ksize <= 256 ? stackalloc double[ksize] : new double[ksize];
        for (int xx = 0; xx < outSize; xx++)
        {
            double center = 0.0 + (xx + 0.5) * scale;
            double ww = 0.0;
            double ss = 1.0 / filterscale;
            int xmin = (int)(center - support + 0.5);
            if (xmin < 0) xmin = 0;
            int xmax = (int)(center + support + 0.5);
            if (xmax > inSize) xmax = inSize;
            xmax -= xmin;
            for (int x = 0; x < xmax; x++)
            {
                double w = BicubicFilter((x + xmin - center + 0.5) * ss);
                k[x] = w;
                ww += w;
            }
            for (int x = 0; x < xmax; x++)
                if (ww != 0.0) k[x] /= ww;
            int o = xx * ksize;
            for (int x = 0; x < xmax; x++)
                kk[o + x] = k[x] < 0
                    ? (int)(-0.5 + k[x] * (1 << PrecisionBits))
                    : (int)(0.5 + k[x] * (1 << PrecisionBits));
            bounds[xx * 2] = xmin;
            bounds[xx * 2 + 1] = xmax;
        }
        return ksize;
    }

    static byte Clip8(int v)
    {
        v >>= PrecisionBits;
        return v < 0 ? (byte)0 : v > 255 ? (byte)255 : (byte)v;
    }

    static void Horizontal(byte[] src, int srcW, int rowOffset, byte[] dst, int dstW, int dstH, int ksize, int[] bounds, int[] kk)
    {
        const int half = 1 << (PrecisionBits - 1);
        for (int yy = 0; yy < dstH; yy++)
        {
            int srcRow = (yy + rowOffset) * srcW * 3;
            int dstRow = yy * dstW * 3;
            for (int xx = 0; xx < dstW; xx++)
            {
                int xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], ko = xx * ksize;
                int ss0 = half, ss1 = half, ss2 = half;
                int p = srcRow + xmin * 3;
                for (int x = 0; x < xmax; x++, p += 3)
                {
                    int kv = kk[ko + x];
                    ss0 += src[p] * kv;
                    ss1 += src[p + 1] * kv;
                    ss2 += src[p + 2] * kv;
                }
                int d = dstRow + xx * 3;
                dst[d] = Clip8(ss0);
                dst[d + 1] = Clip8(ss1);
                dst[d + 2] = Clip8(ss2);
            }
        }
    }

    static void Vertical(byte[] src, int w, byte[] dst, int dstH, int ksize, int[] bounds, int[] kk)
    {
        const int half = 1 << (PrecisionBits - 1);
        int rowLen = w * 3;
        // Each byte of a row is one channel of one pixel and all follow the same integer recipe; summing
        // tap by tap over whole rows keeps memory access sequential (integer sums: order-independent).
        var acc = new int[rowLen];
        for (int yy = 0; yy < dstH; yy++)
        {
            int ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1], ko = yy * ksize;
            Array.Fill(acc, half);
            for (int y = 0; y < ymax; y++)
            {
                int kv = kk[ko + y];
                var row = new ReadOnlySpan<byte>(src, (ymin + y) * rowLen, rowLen);
                for (int i = 0; i < row.Length; i++) acc[i] += row[i] * kv;
            }
            var outRow = new Span<byte>(dst, yy * rowLen, rowLen);
            for (int i = 0; i < outRow.Length; i++) outRow[i] = Clip8(acc[i]);
        }
    }
}
