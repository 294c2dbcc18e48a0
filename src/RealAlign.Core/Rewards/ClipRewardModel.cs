using RealAlign.Core.Imaging;
using RealAlign.Core.Models.Clip;
using RealAlign.Core.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Rewards;

/// <summary>
/// A transformers CLIPModel with the CLIPProcessor saved beside it (PickScore_v1 layout: config.json,
/// model.safetensors, preprocessor_config.json, vocab.json, merges.txt, tokenizer_config.json,
/// special_tokens_map.json). Shared by the pickscore, clip_score and sgp_pickscore scorers.
/// </summary>
public sealed class ClipRewardModel : IDisposable
{
    public CLIPModel Model { get; }
    public ClipTokenizer Tokenizer { get; }
    public ClipImageProcessor Processor { get; }
    public Device Device { get; }

    public ClipRewardModel(CLIPModel model, ClipTokenizer tokenizer, ClipImageProcessor processor, Device device)
    {
        Model = model; Tokenizer = tokenizer; Processor = processor; Device = device;
    }

    public static ClipRewardModel FromPretrained(string folder, Device device)
    {
        var model = CLIPModel.FromPretrained(folder, device);
        model.eval();
        return new ClipRewardModel(model, ClipTokenizer.FromFolder(folder), ClipImageProcessor.FromPretrained(folder), device);
    }

    /// <summary>L2-normalised image features [N, D] (<c>get_image_features</c> / its norm, as PickScore).</summary>
    public Tensor ImageEmbeds(IReadOnlyList<Tensor> rgbImages)
    {
        using var scope = NewDisposeScope();
        var pixels = Processor.Preprocess(rgbImages).to(Device);
        var e = Model.GetImageFeatures(pixels);
        return (e / e.norm(-1, keepdim: true)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// L2-normalised text features [N, D] for <paramref name="prompts"/>; each distinct prompt is
    /// encoded once. Prompts are padded to the longest (<c>padding=True, truncation=True, max_length=77</c>)
    /// with an attention mask, so the pooled feature equals the unpadded one-prompt call.
    /// </summary>
    public Tensor TextEmbeds(IReadOnlyList<string> prompts)
    {
        using var scope = NewDisposeScope();
        var distinct = prompts.Distinct(StringComparer.Ordinal).ToList();
        var maxLen = Math.Min(Tokenizer.ModelMaxLength, 77);
        var longest = distinct.Max(p => Tokenizer.Encode(p, maxLen, padToMax: false).ids.Length);
        var (ids, mask) = Tokenizer.EncodeBatch(distinct, longest);
        var e = Model.GetTextFeatures(ids.to(Device), mask.to(Device));
        e = e / e.norm(-1, keepdim: true);
        var rows = prompts.Select(p => (long)distinct.IndexOf(p)).ToArray();
        return e.index_select(0, torch.tensor(rows, device: Device)).MoveToOuterDisposeScope();
    }

    /// <summary>Row-wise cos(image i, prompt i), [N].</summary>
    public Tensor PairCosine(IReadOnlyList<Tensor> rgbImages, IReadOnlyList<string> prompts)
    {
        using var scope = NewDisposeScope();
        var img = ImageEmbeds(rgbImages);
        var txt = TextEmbeds(prompts);
        return (txt * img).sum(-1).MoveToOuterDisposeScope();
    }

    /// <summary>PickScore of each pair: <c>logit_scale.exp() * cos</c> (yuvalkirstain/PickScore infer_example).</summary>
    public Tensor PickScore(IReadOnlyList<Tensor> rgbImages, IReadOnlyList<string> prompts)
    {
        using var scope = NewDisposeScope();
        return (Model.logit_scale.exp() * PairCosine(rgbImages, prompts)).MoveToOuterDisposeScope();
    }

    public void Dispose() => Model.Dispose();
}
