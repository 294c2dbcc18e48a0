using RealAlign.Core.Imaging;
using RealAlign.Tests.Infrastructure;
using static TorchSharp.torch;

namespace RealAlign.Tests.Imaging;

public class ClipImageProcessorTests
{
    [Fact]
    public void MatchesTransformersClipImageProcessor()
    {
        using var c = Fixtures.Case("clip_image_preprocess");
        var processor = ClipImageProcessor.FromPretrained(c.PathOf(c.Json["processor_dir"]!.GetValue<string>()));
        var images = c.Json["images"]!.AsArray();
        Assert.NotEmpty(images);
        for (int k = 0; k < images.Count; k++)
        {
            using var scope = NewDisposeScope();
            var file = images[k]!["file"]!.GetValue<string>();
            var decoded = ImageCodec.DecodeRgb(File.ReadAllBytes(c.PathOf(file)));
            c.AssertClose($"image_{k}", decoded, c.In($"image_{k}"));
            c.AssertClose($"pixel_values_{k}", processor.Preprocess(decoded));
            c.AssertClose($"pixel_values_{k}", processor.Preprocess(File.ReadAllBytes(c.PathOf(file))));
        }
    }

    [Fact]
    public void ResizeOutputSizeTruncatesTheLongEdge()
    {
        var p = new ClipImageProcessor(new ClipImageProcessorConfig());
        // int(224 * 317 / 211) = 336, int(224 * 401 / 150) = 598
        Assert.Equal((224, 336), p.ResizeOutputSize(211, 317));
        Assert.Equal((598, 224), p.ResizeOutputSize(401, 150));
        Assert.Equal((224, 224), p.ResizeOutputSize(50, 50));
    }

    [Fact]
    public void SmallerThanCropIsZeroPaddedLikeTransformers()
    {
        var cfg = new ClipImageProcessorConfig { DoResize = false, DoRescale = false, DoNormalize = false, CropHeight = 4, CropWidth = 5 };
        var p = new ClipImageProcessor(cfg);
        var rgb = Enumerable.Range(1, 2 * 3 * 3).Select(i => (byte)i).ToArray(); // 2 rows, 3 cols
        var (chw, h, w) = p.PreprocessBytes(rgb, width: 3, height: 2);
        Assert.Equal((4, 5), (h, w));
        // transformers: top_pad = ceil((4-2)/2) = 1, left_pad = ceil((5-3)/2) = 1
        for (int y = 0; y < 4; y++)
            for (int x = 0; x < 5; x++)
            {
                bool inside = y is >= 1 and < 3 && x is >= 1 and < 4;
                float expected = inside ? rgb[((y - 1) * 3 + (x - 1)) * 3] : 0f;
                Assert.Equal(expected, chw[y * 5 + x]);
            }
    }
}
