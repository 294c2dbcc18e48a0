using RealAlign.Core.Imaging;
using RealAlign.Core.Models.OpenClip;
using RealAlign.Core.Rewards;
using RealAlign.Tests.Infrastructure;
using static TorchSharp.torch;

namespace RealAlign.Tests.Rewards;

public class HpsV2ScoreTests
{
    /// <summary>
    /// HPSv2 end to end from the PNG files and the reward folder. The open_clip tokenizer is not
    /// ported yet, so the token ids are the case's stored intermediate (out.text).
    /// </summary>
    [Fact]
    public void ScoresPngFilesLikeHpsV2ImgScore()
    {
        using var c = Fixtures.Case("hps_e2e");
        var folder = c.PathOf(c.Json["reward_dir"]!.GetValue<string>());
        using var model = OpenClipModel.FromPretrained(folder);
        var transform = HpsImageTransform.FromOpenClipConfig(folder);

        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var images = c.Json["images"]!.AsArray()
            .Select(i => transform.Apply(File.ReadAllBytes(c.PathOf(i!["file"]!.GetValue<string>()))))
            .ToArray();
        var pixels = cat(images, 0);
        c.AssertClose("pixel_values", pixels);

        var text = c.Out("text");
        c.AssertClose("image_features_normalized", model.encode_image(pixels, normalize: true));
        c.AssertClose("text_features_normalized", model.encode_text(text, normalize: true));
        var (scores, _) = HpsV2Score.Score(model, pixels, text);
        c.AssertClose("hps_score", scores);
    }
}
