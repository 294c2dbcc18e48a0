using System.Diagnostics;
using RealAlign.Core.Pipelines;
using static TorchSharp.torch;

namespace RealAlign.Bench;

/// <summary>
/// Seconds per image of the public sd3_pipeline folder (diffusers layout, tiny SD3.5-shaped parts) at
/// 64² and 128², 28 steps, CFG 5 — the setting diffusers 0.32.2 was timed at on this machine kind
/// (0.98 s and 11.1 s per image, from the issue) — plus the embedded tiny default.
/// </summary>
public static class GenerationBench
{
    public static double SecondsPerImage(ITextToImagePipeline pipe, int size, int steps, double cfg, int reps, int numImages = 1)
    {
        var o = new GenerationOptions
        {
            Prompt = "a photo of a cat wearing a tiny hat", NegativePrompt = "blurry, low quality",
            Width = size, Height = size, NumInferenceSteps = steps, GuidanceScale = cfg, NumImages = numImages,
            Seeds = Enumerable.Range(0, numImages).Select(i => (long)i).ToArray(),
        };
        using (no_grad()) using (NewDisposeScope()) foreach (var s in pipe.Generate(o, null, CancellationToken.None)) s.Dispose(); // warm-up
        var times = new List<double>();
        for (int r = 0; r < reps; r++)
        {
            var sw = Stopwatch.StartNew();
            using (no_grad()) using (NewDisposeScope()) foreach (var s in pipe.Generate(o, null, CancellationToken.None)) s.Dispose();
            times.Add(sw.Elapsed.TotalSeconds / numImages);
        }
        times.Sort();
        return times[times.Count / 2];
    }

    public static void Run(string fixtures)
    {
        var folder = Path.Combine(fixtures, "sd3_pipeline", "pipeline");
        using var pipe = StableDiffusion3Pipeline.FromPretrained(folder);
        Console.WriteLine("## generation: sd3_pipeline folder, 28 steps, CFG 5, median of 3");
        foreach (var (size, diffusers) in new[] { (64, 0.98), (128, 11.1) })
        {
            double s = SecondsPerImage(pipe, size, 28, 5.0, reps: 3);
            Console.WriteLine($"sd3_pipeline {size}x{size}: {s:F3} s/image  (diffusers 0.32.2 reference {diffusers} s; speed-up x{diffusers / s:F2})");
        }
        using var tiny = TinySd3.Create();
        double t1 = SecondsPerImage(tiny, tiny.DefaultSize, 28, 5.0, reps: 3);
        double t4 = SecondsPerImage(tiny, tiny.DefaultSize, 28, 5.0, reps: 3, numImages: 4);
        Console.WriteLine($"tiny-sd3 {tiny.DefaultSize}x{tiny.DefaultSize}, 28 steps: {1 / t1:F2} images/s (1 per request), {1 / t4:F2} images/s (4 per request)");
    }
}
