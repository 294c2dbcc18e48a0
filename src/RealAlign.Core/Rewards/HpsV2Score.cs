using RealAlign.Core.Models.OpenClip;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Rewards;

/// <summary>
/// HPSv2 / v2.1 scoring lines (tgxs002/HPSv2 <c>hpsv2/img_score.py</c>, <c>score()</c>):
/// normalised open_clip features, <c>logits_per_image = image_features @ text_features.T</c>,
/// score = its diagonal, i.e. cos(image i, prompt i) with NO logit scale (the benchmark script
/// <c>evaluation.py</c> multiplies the same value by 100).
/// </summary>
public static class HpsV2Score
{
    /// <summary>
    /// Scores N (image, prompt) pairs: <paramref name="pixelValues"/> [N, 3, S, S] from
    /// <c>HpsImageTransform</c>, <paramref name="textIds"/> [N, context_length] open_clip token ids.
    /// Returns the [N] scores and the full [N, N] logits_per_image.
    /// </summary>
    public static (Tensor Scores, Tensor LogitsPerImage) Score(OpenClipModel model, Tensor pixelValues, Tensor textIds)
    {
        if (pixelValues.shape[0] != textIds.shape[0])
            throw new ArgumentException($"HPS scores pairs: got {pixelValues.shape[0]} images and {textIds.shape[0]} prompts");
        using var scope = NewDisposeScope();
        var (image, text, _) = model.forward(pixelValues, textIds);
        var logits = torch.matmul(image, text.t());
        var scores = torch.diagonal(logits);
        return (scores.MoveToOuterDisposeScope(), logits.MoveToOuterDisposeScope());
    }
}
