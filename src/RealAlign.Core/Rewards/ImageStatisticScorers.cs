using RealAlign.Core.Imaging;
using static TorchSharp.torch;

namespace RealAlign.Core.Rewards;

/// <summary>
/// The weight-free statistics of <see cref="ImageStatistics"/> as rewards: <c>colorfulness</c>
/// (Hasler–Süsstrunk as RealAlign computes it), <c>laplacian_variance</c> (texture detail) and
/// <c>jpeg_size</c> (bytes at JPEG quality 95; compressibility). They ignore the prompt.
/// </summary>
public sealed class ImageStatisticScorer : IRewardScorer
{
    private readonly Func<Tensor, double> _statistic;

    private ImageStatisticScorer(string kind, Func<Tensor, double> statistic)
    {
        Kind = kind; _statistic = statistic;
        ScoreNames = [kind];
    }

    public static IReadOnlyList<ImageStatisticScorer> All() =>
    [
        new(RewardKinds.Colorfulness, ImageStatistics.Colorfulness),
        new(RewardKinds.LaplacianVariance, ImageStatistics.LaplacianVariance),
        new(RewardKinds.JpegSize, img => ImageStatistics.JpegSize(img)),
    ];

    public string Name => Kind;
    public string Kind { get; }
    public IReadOnlyList<string> ScoreNames { get; }
    public bool NeedsPrompt => false;

    public IReadOnlyList<IReadOnlyDictionary<string, double>> Score(IReadOnlyList<Tensor> rgbImages, IReadOnlyList<string> prompts) =>
        rgbImages.Select(img => (IReadOnlyDictionary<string, double>)new Dictionary<string, double> { [Kind] = _statistic(img) }).ToList();

    public void Dispose() { }
}
