using System.Diagnostics;
using RealAlign.Core.Rewards;
using static TorchSharp.torch;

namespace RealAlign.Bench;

/// <summary>
/// Images/s of the embedded tiny CLIP reward (pickscore, the server's default) scoring 64×48 RGB
/// images at batch 1 vs batch 16, both measured in this run; the ratio is what batching buys.
/// Preprocessing (PIL-exact bicubic resize) is included, as the server pays it too.
/// </summary>
public static class RewardsBench
{
    public static double ImagesPerSecond(IRewardScorer scorer, IReadOnlyList<Tensor> images, IReadOnlyList<string> prompts, int batch, int reps)
    {
        void Pass()
        {
            for (var start = 0; start < images.Count; start += batch)
            {
                var n = Math.Min(batch, images.Count - start);
                using (no_grad()) using (NewDisposeScope())
                    scorer.Score(images.Skip(start).Take(n).ToList(), prompts.Skip(start).Take(n).ToList());
            }
        }
        Pass(); // warm-up
        var rates = new List<double>();
        for (var r = 0; r < reps; r++)
        {
            var sw = Stopwatch.StartNew();
            Pass();
            rates.Add(images.Count / sw.Elapsed.TotalSeconds);
        }
        rates.Sort();
        return rates[rates.Count / 2];
    }

    public static void Run()
    {
        using var registry = RewardRegistry.Load([], CPU);
        var pick = registry.Get(RewardKinds.PickScore);
        var gen = new Generator(7);
        var images = Enumerable.Range(0, 64).Select(_ => randint(0, 256, [48, 64, 3], generator: gen).to(ScalarType.Byte)).ToList();
        var prompts = Enumerable.Range(0, 64).Select(i => $"a photo of a red house number {i % 8}").ToList();
        Console.WriteLine("## rewards: embedded tiny CLIP pickscore, 64 images of 64x48, median of 5");
        double b1 = ImagesPerSecond(pick, images, prompts, 1, reps: 5);
        double b16 = ImagesPerSecond(pick, images, prompts, 16, reps: 5);
        Console.WriteLine($"tiny pickscore: {b1:F1} images/s at batch 1, {b16:F1} images/s at batch 16 (batching x{b16 / b1:F2})");
        foreach (var t in images) t.Dispose();
    }
}
