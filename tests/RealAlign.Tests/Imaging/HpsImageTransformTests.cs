using RealAlign.Core.Imaging;
using RealAlign.Tests.Infrastructure;
using static TorchSharp.torch;

namespace RealAlign.Tests.Imaging;

public class HpsImageTransformTests
{
    [Fact]
    public void MatchesHpsV2ResizeLongestMaxTransform()
    {
        using var c = Fixtures.Case("hps_preprocess");
        var transform = new HpsImageTransform(c.Json["image_size"]!.GetValue<int>());
        var images = c.Json["images"]!.AsArray();
        Assert.NotEmpty(images);
        for (int k = 0; k < images.Count; k++)
        {
            using var scope = NewDisposeScope();
            var meta = images[k]!;
            var decoded = ImageCodec.DecodeRgb(File.ReadAllBytes(c.PathOf(meta["file"]!.GetValue<string>())));
            c.AssertClose($"image_{k}", decoded, c.In($"image_{k}"));
            var resized = meta["resized_hw"]!.AsArray();
            Assert.Equal((resized[0]!.GetValue<int>(), resized[1]!.GetValue<int>()),
                transform.ResizedSize((int)decoded.shape[0], (int)decoded.shape[1]));
            c.AssertClose($"pixel_values_{k}", transform.Apply(decoded));
        }
    }

    [Fact]
    public void ReadsImageSizeAndStatisticsFromOpenClipConfig()
    {
        using var c = Fixtures.Case("open_clip_hps");
        var t = HpsImageTransform.FromOpenClipConfig(c.PathOf(c.Json["model_dir"]!.GetValue<string>()));
        Assert.Equal(c.Json["model_cfg"]!["vision_cfg"]!["image_size"]!.GetValue<int>(), t.ImageSize);
        // in.pixel_values are HPSv2's preprocess_val of the stored images; same transform, so the
        // hps_preprocess case's pre-processing tolerance applies.
        using var pre = Fixtures.Case("hps_preprocess");
        double tol = pre.Tolerance("pixel_values_0").MaxAbs;
        var images = c.Json["images"]!.AsArray();
        using var expected = c.In("pixel_values");
        for (int k = 0; k < images.Count; k++)
        {
            using var scope = NewDisposeScope();
            var got = t.Apply(File.ReadAllBytes(c.PathOf(images[k]!["file"]!.GetValue<string>())));
            double diff = (got[0] - expected[k]).abs().max().item<float>();
            Assert.True(diff <= tol, $"image {k}: max abs diff {diff:E3} (tol {tol:E1})");
        }
    }
}
