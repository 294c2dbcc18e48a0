using RealAlign.Core.IO;
using RealAlign.Core.Models.Clip;
using RealAlign.Core.Text;
using RealAlign.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Tests.Models;

/// <summary>Golden outputs of transformers' CLIP classes (float32, eager attention), per case.json "call".</summary>
public class ClipTests
{
    private static string ModelDir(GoldenCase c) => c.PathOf(c.Json["model_dir"]!.GetValue<string>());

    /// <summary>case.json "input_ids_from" names the tokenizer folder, e.g. "clip_tokenizer/tokenizer_2 (padding=...)".</summary>
    private static ClipTokenizer TokenizerOf(GoldenCase c)
    {
        var from = c.Json["input_ids_from"]!.GetValue<string>().Split(' ')[0].Split('/');
        return ClipTokenizer.FromFolder(Path.Combine([Fixtures.Root, .. from]));
    }

    private static List<string> Prompts(GoldenCase c) =>
        c.Json["prompts"]!.AsArray().Select(p => p!.GetValue<string>()).ToList();

    [Theory]
    [InlineData("clip_text_l")]
    [InlineData("clip_text_g")]
    public void TextModelWithProjectionMatchesTransformers(string caseName)
    {
        using var c = Fixtures.Case(caseName);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var model = CLIPTextModelWithProjection.FromPretrained(ModelDir(c));
        Assert.Equal(c.Json["config"]!["hidden_act"]!.GetValue<string>(), model.Config.HiddenAct);
        Assert.Equal(c.Json["config"]!["eos_token_id"]!.GetValue<int>(), model.Config.EosTokenId);

        var o = model.forward(c.In("input_ids"));
        c.AssertClose("text_embeds", o.TextEmbeds);
        c.AssertClose("last_hidden_state", o.LastHiddenState);
        Assert.Equal(model.Config.NumHiddenLayers + 1, o.HiddenStates.Count);
        c.AssertClose("hidden_states", stack(o.HiddenStates));
    }

    [Theory]
    [InlineData("clip_text_l")]
    [InlineData("clip_text_g")]
    [InlineData("clip_model")]
    public void TokenizerReproducesTheCaseInputIds(string caseName)
    {
        using var c = Fixtures.Case(caseName);
        using var scope = NewDisposeScope();
        var (ids, mask) = TokenizerOf(c).EncodeBatch(Prompts(c));
        c.AssertClose("input_ids", ids, c.In("input_ids"));
        if (c.IO.Contains("in.attention_mask"))
            c.AssertClose("attention_mask", mask, c.In("attention_mask"));
    }

    [Fact]
    public void VisionModelWithProjectionMatchesTransformers()
    {
        using var c = Fixtures.Case("clip_vision");
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var model = CLIPVisionModelWithProjection.FromPretrained(ModelDir(c));

        var o = model.forward(c.In("pixel_values"));
        c.AssertClose("image_embeds", o.ImageEmbeds);
        c.AssertClose("last_hidden_state", o.LastHiddenState);
        Assert.Equal(model.Config.NumHiddenLayers + 1, o.HiddenStates.Count);
        c.AssertClose("hidden_states", stack(o.HiddenStates));
    }

    [Fact]
    public void ClipModelFeaturesLogitsAndPickScoreMatchTransformers()
    {
        using var c = Fixtures.Case("clip_model");
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var model = CLIPModel.FromPretrained(ModelDir(c));
        var input_ids = c.In("input_ids");
        var attention_mask = c.In("attention_mask");
        var pixel_values = c.In("pixel_values");

        c.AssertClose("text_embeds", model.GetTextFeatures(input_ids, attention_mask));
        c.AssertClose("image_embeds", model.GetImageFeatures(pixel_values));
        var o = model.forward(input_ids, pixel_values, attention_mask);
        c.AssertClose("logits_per_image", o.LogitsPerImage);
        c.AssertClose("logit_scale", model.logit_scale.detach().reshape(1));

        // PickScore's scoring lines (case.json "pickscore_code"), one prompt against all images.
        var scores = new List<Tensor>();
        var probs = new List<Tensor>();
        for (long i = 0; i < input_ids.shape[0]; i++)
        {
            var image_embs = model.GetImageFeatures(pixel_values);
            image_embs = image_embs / image_embs.norm(-1, keepdim: true);
            var text_embs = model.GetTextFeatures(input_ids[TensorIndex.Slice(i, i + 1)], attention_mask[TensorIndex.Slice(i, i + 1)]);
            text_embs = text_embs / text_embs.norm(-1, keepdim: true);
            var s = model.logit_scale.exp() * matmul(text_embs, image_embs.T)[0];
            scores.Add(s);
            probs.Add(s.softmax(-1));
        }
        c.AssertClose("pickscore_scores", stack(scores));
        c.AssertClose("pickscore_probs", stack(probs));
    }

    [Fact]
    public void TowersLoadFromAClipModelFolder()
    {
        // transformers loads CLIPTextModelWithProjection / CLIPVisionModelWithProjection from a CLIPModel
        // checkpoint by ignoring the other tower's weights; the nested configs omit projection_dim.
        using var c = Fixtures.Case("clip_model");
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var text = CLIPTextModelWithProjection.FromPretrained(ModelDir(c));
        var vision = CLIPVisionModelWithProjection.FromPretrained(ModelDir(c));
        c.AssertClose("text_embeds", text.forward(c.In("input_ids"), c.In("attention_mask")).TextEmbeds);
        c.AssertClose("image_embeds", vision.forward(c.In("pixel_values")).ImageEmbeds);
        // text_embeds do not depend on the padding mask (causal mask; case.json cross_check).
        c.AssertClose("text_embeds", text.forward(c.In("input_ids")).TextEmbeds);
    }

    [Fact]
    public void StrictLoadRejectsAnotherModelsCheckpoint()
    {
        using var c = Fixtures.Case("clip_vision");
        Assert.Throws<CheckpointMismatchException>(() => CLIPTextModelWithProjection.FromPretrained(ModelDir(c)));
    }

    [Fact]
    public void StateDictKeysAreTheCheckpointKeys()
    {
        using var c = Fixtures.Case("clip_model");
        using var ck = SafeTensorsCheckpoint.OpenFolder(ModelDir(c), "model");
        using var model = new CLIPModel(CLIPConfig.FromFile(Path.Combine(ModelDir(c), "config.json")));
        Assert.Equal(ck.Keys.OrderBy(k => k, StringComparer.Ordinal), model.state_dict().Keys.OrderBy(k => k, StringComparer.Ordinal));
    }

    [Fact]
    public void Bfloat16LoadRunsCloseToFloat32()
    {
        using var c = Fixtures.Case("clip_text_g");
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var model = CLIPTextModelWithProjection.FromPretrained(ModelDir(c), CPU, ScalarType.BFloat16);
        var o = model.forward(c.In("input_ids"));
        Assert.Equal(ScalarType.BFloat16, o.TextEmbeds.dtype);
        var got = o.HiddenStates[^2].to(ScalarType.Float32);
        var want = c.Out("hidden_states")[-2];
        double rel = (got - want).norm().item<float>() / want.norm().item<float>();
        Assert.True(rel < 0.05, $"bf16 penultimate hidden state rel_l2 {rel:E2}");
    }
}
