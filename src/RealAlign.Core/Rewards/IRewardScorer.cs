using static TorchSharp.torch;

namespace RealAlign.Core.Rewards;

/// <summary>
/// A named reward: scores images (uint8 RGB [H, W, 3]) with their prompts. <see cref="Score"/> is
/// called on the device thread inside a dispose scope and no_grad, with a batch of any size; it
/// returns one dictionary per image whose keys are <see cref="ScoreNames"/>.
/// </summary>
public interface IRewardScorer : IDisposable
{
    /// <summary>The name clients ask for (<c>--reward NAME=...</c>).</summary>
    string Name { get; }
    /// <summary>pickscore, clip_score, sgp_pickscore, aesthetic, hpsv2, colorfulness, laplacian_variance, jpeg_size.</summary>
    string Kind { get; }
    /// <summary>Keys of the dictionaries <see cref="Score"/> returns; the first is always <see cref="Name"/>.</summary>
    IReadOnlyList<string> ScoreNames { get; }
    /// <summary>False for rewards that ignore the prompt (aesthetic, image statistics).</summary>
    bool NeedsPrompt { get; }

    IReadOnlyList<IReadOnlyDictionary<string, double>> Score(IReadOnlyList<Tensor> rgbImages, IReadOnlyList<string> prompts);
}

/// <summary>The reward kinds <c>--reward NAME=KIND:DIR</c> accepts, plus the weight-free statistics.</summary>
public static class RewardKinds
{
    public const string PickScore = "pickscore";
    public const string ClipScore = "clip_score";
    public const string SgpPickScore = "sgp_pickscore";
    public const string Aesthetic = "aesthetic";
    public const string HpsV2 = "hpsv2";
    public const string Colorfulness = "colorfulness";
    public const string LaplacianVariance = "laplacian_variance";
    public const string JpegSize = "jpeg_size";

    /// <summary>Kinds loaded from a folder.</summary>
    public static readonly IReadOnlyList<string> Loadable = [PickScore, ClipScore, SgpPickScore, Aesthetic, HpsV2];
}

/// <summary>The named reward is not loaded (the server maps it to NOT_FOUND).</summary>
public sealed class RewardNotFoundException(string name, IEnumerable<string> loaded)
    : Exception($"reward '{name}' is not loaded; loaded rewards: {string.Join(", ", loaded.DefaultIfEmpty("(none)"))}")
{
    public string RewardName { get; } = name;
}

internal static class ScoreRows
{
    public static IReadOnlyList<IReadOnlyDictionary<string, double>> Of(string name, float[] values) =>
        values.Select(v => (IReadOnlyDictionary<string, double>)new Dictionary<string, double> { [name] = v }).ToList();

    public static void CheckPairs(IReadOnlyList<Tensor> images, IReadOnlyList<string> prompts, string reward)
    {
        if (images.Count != prompts.Count)
            throw new ArgumentException($"reward '{reward}' scores (image, prompt) pairs: got {images.Count} images and {prompts.Count} prompts");
    }

    public static float[] ToFloats(Tensor t) => t.detach().to(ScalarType.Float32, CPU).contiguous().data<float>().ToArray();
}
