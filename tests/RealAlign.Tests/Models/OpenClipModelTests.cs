using RealAlign.Core.Models.OpenClip;
using RealAlign.Core.Rewards;
using RealAlign.Tests.Infrastructure;
using static TorchSharp.torch;

namespace RealAlign.Tests.Models;

public class OpenClipModelTests
{
    [Fact]
    public void MatchesOpenClipAndHpsV2()
    {
        using var c = Fixtures.Case("open_clip_hps");
        using var model = OpenClipModel.FromPretrained(c.PathOf(c.Json["model_dir"]!.GetValue<string>()));
        var keys = c.Json["state_dict_keys"]!.AsArray().Select(k => k!.GetValue<string>()).ToHashSet();
        Assert.Equal(keys, model.state_dict().Keys.ToHashSet());

        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var pixels = c.In("pixel_values");
        var text = c.In("text");
        c.AssertClose("image_features", model.encode_image(pixels));
        c.AssertClose("image_features_normalized", model.encode_image(pixels, normalize: true));
        c.AssertClose("text_features", model.encode_text(text));
        c.AssertClose("text_features_normalized", model.encode_text(text, normalize: true));
        c.AssertClose("logit_scale", model.logit_scale.detach().reshape(1));

        var (scores, logits) = HpsV2Score.Score(model, pixels, text);
        c.AssertClose("logits_per_image_hps", logits);
        c.AssertClose("hps_score", scores);
    }

    [Fact]
    public void ConfigReadsOpenClipHubLayout()
    {
        using var c = Fixtures.Case("open_clip_hps");
        var cfg = OpenClipConfig.Read(c.PathOf(c.Json["model_dir"]!.GetValue<string>(), "open_clip_config.json"));
        var mc = c.Json["model_cfg"]!;
        Assert.Equal(mc["embed_dim"]!.GetValue<int>(), cfg.EmbedDim);
        Assert.Equal(mc["vision_cfg"]!["width"]!.GetValue<int>() / mc["vision_cfg"]!["head_width"]!.GetValue<int>(), cfg.Vision.Heads);
        Assert.Equal(mc["text_cfg"]!["heads"]!.GetValue<int>(), cfg.Text.Heads);
        Assert.NotNull(cfg.PreprocessMean);
    }

    [Fact]
    public void LayerScaleAddsGammaParameters()
    {
        var cfg = new OpenClipConfig
        {
            EmbedDim = 8,
            Vision = new OpenClipVisionConfig { Layers = 1, Width = 16, HeadWidth = 8, PatchSize = 4, ImageHeight = 8, ImageWidth = 8, LsInitValue = 0.1 },
            Text = new OpenClipTextConfig { ContextLength = 5, VocabSize = 10, Width = 8, Heads = 2, Layers = 1 },
        };
        using var model = new OpenClipModel(cfg);
        var keys = model.state_dict().Keys.ToList();
        Assert.Contains("visual.transformer.resblocks.0.ls_1.gamma", keys);
        Assert.Contains("visual.transformer.resblocks.0.ls_2.gamma", keys);
        Assert.DoesNotContain("transformer.resblocks.0.ls_1.gamma", keys);
    }
}
