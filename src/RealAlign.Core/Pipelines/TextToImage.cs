using static TorchSharp.torch;

namespace RealAlign.Core.Pipelines;

/// <summary>What one text-to-image call needs (one prompt, <see cref="NumImages"/> samples).</summary>
public sealed record GenerationOptions
{
    public required string Prompt { get; init; }
    public string NegativePrompt { get; init; } = "";
    public int Width { get; init; } = 1024;
    public int Height { get; init; } = 1024;
    public int NumInferenceSteps { get; init; } = 28;
    public double GuidanceScale { get; init; } = 7.0;
    public int NumImages { get; init; } = 1;
    /// <summary>One seed per image; a seed fully determines that image's prior noise.</summary>
    public IReadOnlyList<long>? Seeds { get; init; }
    /// <summary>Explicit x_T per image, float32 CPU [C, H/f, W/f]; when given it *is* the prior noise.</summary>
    public IReadOnlyList<Tensor>? PriorNoise { get; init; }
}

/// <summary>Progress callback payload: denoising step <see cref="Step"/> of <see cref="TotalSteps"/> finished.</summary>
public readonly record struct StepProgress(int Step, int TotalSteps, double Timestep);

/// <summary>One generated sample. Tensors are CPU float32, owned by the caller.</summary>
public sealed class GeneratedSample : IDisposable
{
    public required int Index { get; init; }
    /// <summary>The seed that drew the prior noise (or the caller's seed when noise was given).</summary>
    public required long Seed { get; init; }
    /// <summary>x_T exactly as used, [C, H/f, W/f].</summary>
    public required Tensor PriorNoise { get; init; }
    /// <summary>Final latents before VAE un-scaling, [C, H/f, W/f].</summary>
    public required Tensor Latents { get; init; }
    /// <summary>Decoded image in [0, 1], [3, H, W].</summary>
    public required Tensor Image { get; init; }

    public void Dispose() { PriorNoise.Dispose(); Latents.Dispose(); Image.Dispose(); }
}

/// <summary>A resident text-to-image backbone (SD3/SD3.5 today; FLUX later).</summary>
public interface ITextToImagePipeline : IDisposable
{
    string Family { get; }
    int LatentChannels { get; }
    /// <summary>VAE spatial factor f (8 for real SD3; 2 for the tiny fixtures).</summary>
    int VaeScaleFactor { get; }
    /// <summary>Width/height must be multiples of this (f × transformer patch size).</summary>
    int SizeMultiple { get; }
    Device Device { get; }

    /// <summary>
    /// Runs the full sampler. Must be called on the device executor's thread; checks
    /// <paramref name="ct"/> between denoising steps.
    /// </summary>
    IReadOnlyList<GeneratedSample> Generate(GenerationOptions options, Action<StepProgress>? onStep, CancellationToken ct);
}
