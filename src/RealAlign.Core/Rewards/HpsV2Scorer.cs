using RealAlign.Core.Imaging;
using RealAlign.Core.Models.OpenClip;
using RealAlign.Core.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Rewards;

/// <summary>
/// <c>hpsv2</c>: HPSv2 / v2.1 on an open_clip folder (hps_e2e's reward/: open_clip_config.json,
/// open_clip_model.safetensors, bpe_simple_vocab_16e6.txt.gz). Preprocess = HPSv2's resize-longest +
/// pad (<see cref="HpsImageTransform"/>), tokens = open_clip's tokenizer, score = cos(image, prompt)
/// (<see cref="HpsV2Score"/>); each distinct prompt is encoded once.
/// </summary>
public sealed class HpsV2Scorer : IRewardScorer
{
    private readonly OpenClipModel _model;
    private readonly HpsImageTransform _transform;
    private readonly OpenClipTokenizer _tokenizer;
    private readonly Device _device;

    public HpsV2Scorer(string name, OpenClipModel model, HpsImageTransform transform, OpenClipTokenizer tokenizer, Device device)
    {
        Name = name; _model = model; _transform = transform; _tokenizer = tokenizer; _device = device;
        ScoreNames = [name];
    }

    public static HpsV2Scorer FromPretrained(string name, string folder, Device device)
    {
        var model = OpenClipModel.FromPretrained(folder, device);
        return new HpsV2Scorer(name, model, HpsImageTransform.FromOpenClipConfig(folder),
            OpenClipTokenizer.FromFolder(folder, model.Config.Text.ContextLength), device);
    }

    public string Name { get; }
    public string Kind => RewardKinds.HpsV2;
    public IReadOnlyList<string> ScoreNames { get; }
    public bool NeedsPrompt => true;

    public IReadOnlyList<IReadOnlyDictionary<string, double>> Score(IReadOnlyList<Tensor> rgbImages, IReadOnlyList<string> prompts)
    {
        ScoreRows.CheckPairs(rgbImages, prompts, Name);
        using var scope = NewDisposeScope();
        var pixels = rgbImages.Select(_transform.Apply).ToList();
        // An image whose longest side already equals the image size stays unpadded (upstream quirk),
        // so it cannot share a batch with square ones.
        Tensor image = pixels.All(p => p.shape.SequenceEqual(pixels[0].shape))
            ? _model.encode_image(torch.cat(pixels, 0).to(_device), normalize: true)
            : torch.cat(pixels.Select(p => _model.encode_image(p.to(_device), normalize: true)).ToArray(), 0);
        var distinct = prompts.Distinct(StringComparer.Ordinal).ToList();
        var text = _model.encode_text(_tokenizer.EncodeBatch(distinct).to(_device), normalize: true);
        var rows = torch.tensor(prompts.Select(p => (long)distinct.IndexOf(p)).ToArray(), device: _device);
        var scores = (image * text.index_select(0, rows)).sum(-1);
        return ScoreRows.Of(Name, ScoreRows.ToFloats(scores));
    }

    public void Dispose() => _model.Dispose();
}
