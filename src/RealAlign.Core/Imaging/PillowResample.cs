namespace RealAlign.Core.Imaging;

/// <summary>PIL's resampling filter ids (<c>PIL.Image.Resampling</c>), as stored in preprocessor configs.</summary>
public enum PilResample
{
    Nearest = 0,
    Lanczos = 1,
    Bilinear = 2,
    Bicubic = 3,
    Box = 4,
    Hamming = 5,
}

/// <summary>
/// Pillow's <c>Image.resize</c> for 8-bit images, reproduced bit for bit from Pillow 9.4
/// <c>src/libImaging/Resample.c</c>: a separable convolution whose support grows with the
/// downscale factor (antialiasing), coefficients normalised per output pixel and quantised to
/// 22-bit fixed point, a horizontal pass then a vertical pass, each rounded and clipped to uint8.
/// A pass whose size does not change is skipped, as upstream's <c>need_horizontal/need_vertical</c>.
/// </summary>
public static class PillowResample
{
    private const int PrecisionBits = 32 - 8 - 2;

    /// <summary>Resizes interleaved 8-bit pixels (<paramref name="channels"/> per pixel, row-major).</summary>
    public static byte[] Resize(byte[] src, int width, int height, int channels, int outWidth, int outHeight, PilResample filter)
    {
        if (width <= 0 || height <= 0 || outWidth <= 0 || outHeight <= 0)
            throw new ArgumentException($"cannot resize {width}x{height} to {outWidth}x{outHeight}");
        if (src.LongLength != (long)width * height * channels)
            throw new ArgumentException($"expected {(long)width * height * channels} bytes for {width}x{height}x{channels}, got {src.LongLength}");
        if (filter == PilResample.Nearest)
            throw new NotSupportedException("PIL NEAREST resampling (resample=0) is not implemented; use BICUBIC (3), BILINEAR (2), LANCZOS (1), BOX (4) or HAMMING (5)");

        var (support, kernel) = Filter(filter);
        byte[] current = src;
        int curW = width;
        if (outWidth != width)
        {
            var (bounds, kk, ksize) = PrecomputeCoeffs(width, outWidth, support, kernel);
            current = Horizontal(current, curW, height, channels, outWidth, bounds, kk, ksize);
            curW = outWidth;
        }
        if (outHeight != height)
        {
            var (bounds, kk, ksize) = PrecomputeCoeffs(height, outHeight, support, kernel);
            current = Vertical(current, curW, height, channels, outHeight, bounds, kk, ksize);
        }
        return ReferenceEquals(current, src) ? (byte[])src.Clone() : current;
    }

    private static (double Support, Func<double, double> Kernel) Filter(PilResample filter) => filter switch
    {
        PilResample.Box => (0.5, BoxFilter),
        PilResample.Bilinear => (1.0, BilinearFilter),
        PilResample.Hamming => (1.0, HammingFilter),
        PilResample.Bicubic => (2.0, BicubicFilter),
        PilResample.Lanczos => (3.0, LanczosFilter),
        _ => throw new NotSupportedException($"unknown PIL resampling filter {(int)filter}"),
    };

    private static double BoxFilter(double x) => x > -0.5 && x <= 0.5 ? 1.0 : 0.0;

    private static double BilinearFilter(double x)
    {
        if (x < 0.0) x = -x;
        return x < 1.0 ? 1.0 - x : 0.0;
    }

    private static double HammingFilter(double x)
    {
        if (x < 0.0) x = -x;
        if (x == 0.0) return 1.0;
        if (x >= 1.0) return 0.0;
        x *= Math.PI;
        // Upstream writes the window constants as float literals promoted to double.
        return Math.Sin(x) / x * ((double)0.54f + (double)0.46f * Math.Cos(x));
    }

    private static double BicubicFilter(double x)
    {
        const double a = -0.5;
        if (x < 0.0) x = -x;
        if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
        if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
        return 0.0;
    }

    private static double Sinc(double x)
    {
        if (x == 0.0) return 1.0;
        x *= Math.PI;
        return Math.Sin(x) / x;
    }

    private static double LanczosFilter(double x) => -3.0 <= x && x < 3.0 ? Sinc(x) * Sinc(x / 3) : 0.0;

    /// <summary>Upstream <c>precompute_coeffs</c> + <c>normalize_coeffs_8bpc</c> for the box (0, inSize).</summary>
    private static (int[] Bounds, int[] Kk, int KSize) PrecomputeCoeffs(int inSize, int outSize, double filterSupport, Func<double, double> filter)
    {
        double scale = (double)(float)inSize / outSize;
        double filterscale = scale < 1.0 ? 1.0 : scale;
        double support = filterSupport * filterscale;
        int ksize = (int)Math.Ceiling(support) * 2 + 1;
        var bounds = new int[outSize * 2];
        var kk = new int[outSize * ksize];
        var k = new double[ksize];
        for (int xx = 0; xx < outSize; xx++)
        {
            double center = (xx + 0.5) * scale;
            double ww = 0.0;
            double ss = 1.0 / filterscale;
            int xmin = (int)(center - support + 0.5);
            if (xmin < 0) xmin = 0;
            int xmax = (int)(center + support + 0.5);
            if (xmax > inSize) xmax = inSize;
            xmax -= xmin;
            Array.Clear(k);
            for (int x = 0; x < xmax; x++)
            {
                double w = filter((x + xmin - center + 0.5) * ss);
                k[x] = w;
                ww += w;
            }
            for (int x = 0; x < xmax; x++)
                if (ww != 0.0) k[x] /= ww;
            for (int x = 0; x < ksize; x++)
                kk[xx * ksize + x] = k[x] < 0
                    ? (int)(-0.5 + k[x] * (1 << PrecisionBits))
                    : (int)(0.5 + k[x] * (1 << PrecisionBits));
            bounds[xx * 2] = xmin;
            bounds[xx * 2 + 1] = xmax;
        }
        return (bounds, kk, ksize);
    }

    /// <summary>Upstream <c>clip8</c>: drop the fixed-point fraction and saturate to [0, 255].</summary>
    private static byte Clip8(int value)
    {
        int v = value >> PrecisionBits;
        return v < 0 ? (byte)0 : v > 255 ? (byte)255 : (byte)v;
    }

    private static byte[] Horizontal(byte[] src, int width, int height, int channels, int outWidth, int[] bounds, int[] kk, int ksize)
    {
        var dst = new byte[(long)outWidth * height * channels];
        for (int yy = 0; yy < height; yy++)
        {
            long rowIn = (long)yy * width * channels, rowOut = (long)yy * outWidth * channels;
            for (int xx = 0; xx < outWidth; xx++)
            {
                int xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], kOff = xx * ksize;
                for (int c = 0; c < channels; c++)
                {
                    int ss = 1 << (PrecisionBits - 1);
                    for (int x = 0; x < xmax; x++)
                        ss = unchecked(ss + src[rowIn + (long)(x + xmin) * channels + c] * kk[kOff + x]);
                    dst[rowOut + (long)xx * channels + c] = Clip8(ss);
                }
            }
        }
        return dst;
    }

    private static byte[] Vertical(byte[] src, int width, int height, int channels, int outHeight, int[] bounds, int[] kk, int ksize)
    {
        var dst = new byte[(long)width * outHeight * channels];
        long stride = (long)width * channels;
        for (int yy = 0; yy < outHeight; yy++)
        {
            int ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1], kOff = yy * ksize;
            for (long i = 0; i < stride; i++)
            {
                int ss = 1 << (PrecisionBits - 1);
                for (int y = 0; y < ymax; y++)
                    ss = unchecked(ss + src[(y + ymin) * stride + i] * kk[kOff + y]);
                dst[yy * stride + i] = Clip8(ss);
            }
        }
        return dst;
    }
}
