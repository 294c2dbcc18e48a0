using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Rewards;

/// <summary><c>pickscore</c>: <c>logit_scale.exp() · cos(text, image)</c> on the raw scale (not /26, not softmaxed).</summary>
public sealed class PickScoreScorer(string name, ClipRewardModel clip, bool ownsModel = true) : IRewardScorer
{
    public string Name => name;
    public string Kind => RewardKinds.PickScore;
    public IReadOnlyList<string> ScoreNames { get; } = [name];
    public bool NeedsPrompt => true;
    public ClipRewardModel Clip => clip;

    public IReadOnlyList<IReadOnlyDictionary<string, double>> Score(IReadOnlyList<Tensor> rgbImages, IReadOnlyList<string> prompts)
    {
        ScoreRows.CheckPairs(rgbImages, prompts, name);
        return ScoreRows.Of(name, ScoreRows.ToFloats(clip.PickScore(rgbImages, prompts)));
    }

    public void Dispose() { if (ownsModel) clip.Dispose(); }
}

/// <summary>
/// <c>clip_score</c>: the torchmetrics / "CLIPScore" convention, <c>max(100 · cos, 0)</c>, under the
/// reward's name, and the raw cosine under <c>clip_cosine</c> (for a reward named <c>clip_score</c>)
/// or <c>NAME_cosine</c>.
/// </summary>
public sealed class ClipScoreScorer : IRewardScorer
{
    private readonly ClipRewardModel _clip;
    private readonly bool _ownsModel;
    private readonly string _cosineName;

    public ClipScoreScorer(string name, ClipRewardModel clip, bool ownsModel = true)
    {
        Name = name; _clip = clip; _ownsModel = ownsModel;
        _cosineName = name == RewardKinds.ClipScore ? "clip_cosine" : name + "_cosine";
        ScoreNames = [name, _cosineName];
    }

    public string Name { get; }
    public string Kind => RewardKinds.ClipScore;
    public IReadOnlyList<string> ScoreNames { get; }
    public bool NeedsPrompt => true;

    public IReadOnlyList<IReadOnlyDictionary<string, double>> Score(IReadOnlyList<Tensor> rgbImages, IReadOnlyList<string> prompts)
    {
        ScoreRows.CheckPairs(rgbImages, prompts, Name);
        var cos = ScoreRows.ToFloats(_clip.PairCosine(rgbImages, prompts));
        return cos.Select(c => (IReadOnlyDictionary<string, double>)new Dictionary<string, double>
        {
            [Name] = Math.Max(100.0 * c, 0.0),
            [_cosineName] = c,
        }).ToList();
    }

    public void Dispose() { if (_ownsModel) _clip.Dispose(); }
}

/// <summary>
/// <c>sgp_pickscore</c> (RealAlign's SGP realism score): PickScore(image, "Realistic photo, " + prompt)
/// − PickScore(image, "CG render, " + prompt) on the raw PickScore scale, float32 subtraction.
/// The image is embedded once and the 2N prompts in one text batch.
/// </summary>
public sealed class SgpPickScoreScorer(string name, ClipRewardModel clip, bool ownsModel = true) : IRewardScorer
{
    public const string RealisticPrefix = "Realistic photo, ";
    public const string CgPrefix = "CG render, ";

    public string Name => name;
    public string Kind => RewardKinds.SgpPickScore;
    public IReadOnlyList<string> ScoreNames { get; } = [name];
    public bool NeedsPrompt => true;

    public IReadOnlyList<IReadOnlyDictionary<string, double>> Score(IReadOnlyList<Tensor> rgbImages, IReadOnlyList<string> prompts)
    {
        ScoreRows.CheckPairs(rgbImages, prompts, name);
        using var scope = NewDisposeScope();
        var n = prompts.Count;
        var img = clip.ImageEmbeds(rgbImages);
        var txt = clip.TextEmbeds([.. prompts.Select(p => RealisticPrefix + p), .. prompts.Select(p => CgPrefix + p)]);
        var scale = clip.Model.logit_scale.exp();
        var realistic = scale * (txt[TensorIndex.Slice(0, n)] * img).sum(-1);
        var cg = scale * (txt[TensorIndex.Slice(n, 2 * n)] * img).sum(-1);
        return ScoreRows.Of(name, ScoreRows.ToFloats(realistic - cg));
    }

    public void Dispose() { if (ownsModel) clip.Dispose(); }
}
