using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Imaging;

/// <summary>
/// Weight-free image statistics used by data curation and as simple rewards. All take an RGB
/// uint8 image, [H, W, 3] as a tensor or as interleaved bytes.
/// </summary>
public static class ImageStatistics
{
    /// <summary>
    /// Hasler &amp; Süsstrunk (2003) colourfulness exactly as RealAlign's
    /// <c>data_curation/score/colorfulness.py</c>: on RGB values 0–255, rg = R − G,
    /// yb = 0.5·(R + G) − B, C = sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²) with population
    /// standard deviations and signed means (no absolute value). Sums are accumulated in float64
    /// (upstream's numpy reductions run on float32 arrays, so results agree to about 1e-6 relative).
    /// </summary>
    public static double Colorfulness(Tensor imageHwc) => Colorfulness(Bytes(imageHwc, out _, out _));

    /// <inheritdoc cref="Colorfulness(Tensor)"/>
    public static double Colorfulness(ReadOnlySpan<byte> rgb)
    {
        long n = rgb.Length / 3;
        if (n == 0 || rgb.Length % 3 != 0) throw new ArgumentException($"expected interleaved RGB bytes, got {rgb.Length} bytes");
        double sumRg = 0, sumYb = 0;
        for (long p = 0; p < n; p++)
        {
            double r = rgb[(int)(p * 3)], g = rgb[(int)(p * 3 + 1)], b = rgb[(int)(p * 3 + 2)];
            sumRg += r - g;
            sumYb += 0.5 * (r + g) - b;
        }
        double meanRg = sumRg / n, meanYb = sumYb / n;
        double varRg = 0, varYb = 0;
        for (long p = 0; p < n; p++)
        {
            double r = rgb[(int)(p * 3)], g = rgb[(int)(p * 3 + 1)], b = rgb[(int)(p * 3 + 2)];
            double drg = r - g - meanRg, dyb = 0.5 * (r + g) - b - meanYb;
            varRg += drg * drg;
            varYb += dyb * dyb;
        }
        varRg /= n;
        varYb /= n;
        return Math.Sqrt(varRg + varYb) + 0.3 * Math.Sqrt(meanRg * meanRg + meanYb * meanYb);
    }

    /// <summary>
    /// Variance of the Laplacian, a sharpness/blur measure. Definition used here (there is no single
    /// upstream one): grey = ITU-R BT.601 luma 0.299·R + 0.587·G + 0.114·B on 0–255 values, kept in
    /// float64 without rounding; the 3×3 Laplacian [0,1,0; 1,−4,1; 0,1,0] evaluated only on the
    /// valid interior (no border padding, so (H−2)·(W−2) responses); population variance of those
    /// responses. It therefore differs slightly from the common OpenCV recipe
    /// (<c>cv2.Laplacian(cvtColor(img, GRAY), CV_64F).var()</c>), which rounds grey to uint8 and
    /// includes reflected borders. Needs an image of at least 3×3.
    /// </summary>
    public static double LaplacianVariance(Tensor imageHwc)
    {
        var rgb = Bytes(imageHwc, out int w, out int h);
        return LaplacianVariance(rgb, w, h);
    }

    /// <inheritdoc cref="LaplacianVariance(Tensor)"/>
    public static double LaplacianVariance(ReadOnlySpan<byte> rgb, int width, int height)
    {
        if ((long)width * height * 3 != rgb.Length) throw new ArgumentException($"expected {(long)width * height * 3} RGB bytes for {width}x{height}, got {rgb.Length}");
        if (width < 3 || height < 3) throw new ArgumentException($"the Laplacian variance needs an image of at least 3x3, got {width}x{height}");
        var grey = new double[(long)width * height];
        for (long p = 0; p < grey.LongLength; p++)
            grey[p] = 0.299 * rgb[(int)(p * 3)] + 0.587 * rgb[(int)(p * 3 + 1)] + 0.114 * rgb[(int)(p * 3 + 2)];
        long count = (long)(width - 2) * (height - 2);
        double sum = 0, sumSq = 0;
        // Two passes (mean, then squared deviations) to avoid cancellation on smooth images.
        var lap = new double[count];
        long i = 0;
        for (int y = 1; y < height - 1; y++)
            for (int x = 1; x < width - 1; x++)
            {
                long c = (long)y * width + x;
                double v = grey[c - width] + grey[c + width] + grey[c - 1] + grey[c + 1] - 4 * grey[c];
                lap[i++] = v;
                sum += v;
            }
        double mean = sum / count;
        foreach (var v in lap) sumSq += (v - mean) * (v - mean);
        return sumSq / count;
    }

    /// <summary>
    /// Size in bytes of the image encoded as JPEG at <paramref name="quality"/> (default 95, the
    /// quality Flow-GRPO's jpeg_(in)compressibility rewards use with PIL). Encoded with SkiaSharp's
    /// libjpeg-turbo encoder (its default 4:2:0 chroma subsampling, no Huffman optimisation), so the
    /// count is a compressibility measure comparable between images encoded here, not a byte-exact
    /// match for PIL's <c>save(format="JPEG", quality=95)</c>.
    /// </summary>
    public static long JpegSize(Tensor imageHwc, int quality = 95)
    {
        var rgb = Bytes(imageHwc, out int w, out int h);
        return JpegSize(rgb, w, h, quality);
    }

    /// <inheritdoc cref="JpegSize(Tensor, int)"/>
    public static long JpegSize(byte[] rgb, int width, int height, int quality = 95) =>
        ImageCodec.EncodeRgb(rgb, width, height, SKEncodedImageFormat.Jpeg, quality).LongLength;

    private static byte[] Bytes(Tensor imageHwc, out int width, out int height)
    {
        if (imageHwc.dtype != ScalarType.Byte || imageHwc.dim() != 3 || imageHwc.shape[2] != 3)
            throw new ArgumentException($"expected an RGB uint8 image [H, W, 3], got {imageHwc.dtype} [{string.Join(",", imageHwc.shape)}]");
        height = (int)imageHwc.shape[0];
        width = (int)imageHwc.shape[1];
        return imageHwc.cpu().contiguous().data<byte>().ToArray();
    }
}
