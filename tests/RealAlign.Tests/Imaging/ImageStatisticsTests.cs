using RealAlign.Core.Imaging;
using static TorchSharp.torch;

namespace RealAlign.Tests.Imaging;

public class ImageStatisticsTests
{
    private static (byte[] Rgb, Tensor Image) Synthetic(int width, int height, int seed)
    {
        var rgb = new byte[width * height * 3];
        new Random(seed).NextBytes(rgb);
        return (rgb, tensor(rgb, new long[] { height, width, 3 }, ScalarType.Byte));
    }

    [Theory]
    [InlineData(7, 5, 1)]
    [InlineData(16, 9, 2)]
    [InlineData(1, 1, 3)]
    public void ColorfulnessMatchesTheHaslerSuesstrunkFormula(int width, int height, int seed)
    {
        var (rgb, image) = Synthetic(width, height, seed);
        using var _ = image;
        int n = width * height;
        var rg = new double[n];
        var yb = new double[n];
        for (int p = 0; p < n; p++)
        {
            double r = rgb[p * 3], g = rgb[p * 3 + 1], b = rgb[p * 3 + 2];
            rg[p] = r - g;
            yb[p] = 0.5 * (r + g) - b;
        }
        double Mean(double[] a) => a.Sum() / a.Length;
        double Std(double[] a) { double m = Mean(a); return Math.Sqrt(a.Sum(v => (v - m) * (v - m)) / a.Length); }
        double expected = Math.Sqrt(Std(rg) * Std(rg) + Std(yb) * Std(yb)) + 0.3 * Math.Sqrt(Mean(rg) * Mean(rg) + Mean(yb) * Mean(yb));
        Assert.Equal(expected, ImageStatistics.Colorfulness(image), 9);
        Assert.Equal(expected, ImageStatistics.Colorfulness(rgb), 9);
    }

    [Fact]
    public void ColorfulnessOfAGreyImageIsZero()
    {
        using var grey = full(new long[] { 4, 4, 3 }, 128, ScalarType.Byte);
        Assert.Equal(0.0, ImageStatistics.Colorfulness(grey), 12);
    }

    [Theory]
    [InlineData(3, 3, 4)]
    [InlineData(11, 6, 5)]
    public void LaplacianVarianceMatchesADirectConvolution(int width, int height, int seed)
    {
        var (rgb, image) = Synthetic(width, height, seed);
        using var _ = image;
        double Y(int x, int y) { int i = (y * width + x) * 3; return 0.299 * rgb[i] + 0.587 * rgb[i + 1] + 0.114 * rgb[i + 2]; }
        var kernel = new double[,] { { 0, 1, 0 }, { 1, -4, 1 }, { 0, 1, 0 } };
        var responses = new List<double>();
        for (int y = 1; y < height - 1; y++)
            for (int x = 1; x < width - 1; x++)
            {
                double s = 0;
                for (int dy = -1; dy <= 1; dy++)
                    for (int dx = -1; dx <= 1; dx++)
                        s += kernel[dy + 1, dx + 1] * Y(x + dx, y + dy);
                responses.Add(s);
            }
        double mean = responses.Average();
        double expected = responses.Sum(v => (v - mean) * (v - mean)) / responses.Count;
        Assert.Equal(expected, ImageStatistics.LaplacianVariance(image), 9);
        Assert.Throws<ArgumentException>(() => ImageStatistics.LaplacianVariance(new byte[2 * 2 * 3], 2, 2));
    }

    [Fact]
    public void JpegSizeIsTheLengthOfAQuality95Jpeg()
    {
        var (rgb, image) = Synthetic(32, 24, 6);
        using var _ = image;
        long size = ImageStatistics.JpegSize(image);
        Assert.Equal(size, ImageCodec.EncodeRgb(rgb, 32, 24, SkiaSharp.SKEncodedImageFormat.Jpeg, 95).LongLength);
        // Smooth images compress better than noise.
        using var flat = full(new long[] { 24, 32, 3 }, 90, ScalarType.Byte);
        Assert.True(ImageStatistics.JpegSize(flat) < size);
        // The bytes are a decodable JPEG of the same size.
        var jpeg = ImageCodec.EncodeRgb(rgb, 32, 24, SkiaSharp.SKEncodedImageFormat.Jpeg, 95);
        Assert.Equal((32, 24), ImageCodec.ReadSize(jpeg));
    }
}
