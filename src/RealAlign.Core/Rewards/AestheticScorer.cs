using RealAlign.Core.Models.Clip;
using RealAlign.Core.Imaging;
using static TorchSharp.torch;

namespace RealAlign.Core.Rewards;

/// <summary>
/// <c>aesthetic</c>: the LAION improved aesthetic predictor. Folder layout (aesthetic_e2e's reward/):
/// <c>clip/</c> = a transformers CLIPModel folder with its preprocessor_config.json (ViT-L/14 for the
/// released head) and <c>aesthetic.safetensors</c> = the MLP with keys <c>layers.0/2/4/6/7.*</c>
/// (clients/python/convert_reward_checkpoints.py writes it). Score = MLP(normalize(get_image_features)).
/// </summary>
public sealed class AestheticScorer : IRewardScorer
{
    private readonly CLIPModel _clip;
    private readonly ClipImageProcessor _processor;
    private readonly AestheticMlp _mlp;
    private readonly Device _device;

    public AestheticScorer(string name, CLIPModel clip, ClipImageProcessor processor, AestheticMlp mlp, Device device)
    {
        Name = name; _clip = clip; _processor = processor; _mlp = mlp; _device = device;
        ScoreNames = [name];
    }

    public static AestheticScorer FromPretrained(string name, string folder, Device device)
    {
        var clipDir = Path.Combine(folder, "clip");
        var head = Path.Combine(folder, "aesthetic.safetensors");
        if (!Directory.Exists(clipDir) || !File.Exists(head))
            throw new FileNotFoundException($"aesthetic reward folder '{folder}' needs clip/ (a CLIPModel folder) and aesthetic.safetensors");
        var clip = CLIPModel.FromPretrained(clipDir, device);
        clip.eval();
        return new AestheticScorer(name, clip, ClipImageProcessor.FromPretrained(clipDir), AestheticMlp.FromPretrained(head, device), device);
    }

    public string Name { get; }
    public string Kind => RewardKinds.Aesthetic;
    public IReadOnlyList<string> ScoreNames { get; }
    public bool NeedsPrompt => false;

    public IReadOnlyList<IReadOnlyDictionary<string, double>> Score(IReadOnlyList<Tensor> rgbImages, IReadOnlyList<string> prompts)
    {
        using var scope = NewDisposeScope();
        var embeds = _clip.GetImageFeatures(_processor.Preprocess(rgbImages).to(_device));
        var scores = _mlp.forward(AestheticMlp.NormalizeEmbeddings(embeds)).reshape(-1);
        return ScoreRows.Of(Name, ScoreRows.ToFloats(scores));
    }

    public void Dispose() { _clip.Dispose(); _mlp.Dispose(); }
}
