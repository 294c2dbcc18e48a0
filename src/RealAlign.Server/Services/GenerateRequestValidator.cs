using RealAlign.Server.Backbones;
using RealAlign.Server.Options;
using RealAlign.Server.Wire;
using RealAlign.V1;
using WireTensor = RealAlign.V1.Tensor;

namespace RealAlign.Server.Services;

/// <summary>A <see cref="GenerateRequest"/> with defaults resolved and every field checked.</summary>
public sealed record ValidatedGenerate(
    Backbone Backbone,
    string Prompt,
    string NegativePrompt,
    int Width,
    int Height,
    int Steps,
    double GuidanceScale,
    int NumImages,
    IReadOnlyList<long>? Seeds,
    IReadOnlyList<WireTensor>? PriorNoise,
    bool ReturnImageTensor,
    bool ReturnLatents,
    bool OmitPng,
    IReadOnlyList<AdapterRef>? Adapters = null);

/// <summary>
/// Checks a request completely before anything reaches the device, so a bad request never costs
/// device time and its error names the field, the index and expected vs actual.
/// </summary>
public static class GenerateRequestValidator
{
    public static ValidatedGenerate Validate(GenerateRequest r, BackboneRegistry registry, ServerOptions limits)
    {
        var backbone = registry.Get(r.Backbone);
        var pipeline = backbone.Pipeline;

        // Names are resolved against the adapter registry when the request starts (GenerationService).
        for (var i = 0; i < r.Adapters.Count; i++)
        {
            if (string.IsNullOrEmpty(r.Adapters[i].Name))
                throw new InvalidRequestException($"adapters[{i}].name: empty");
            if (!float.IsFinite(r.Adapters[i].Scale))
                throw new InvalidRequestException($"adapters[{i}].scale: must be finite, got {r.Adapters[i].Scale.ToString(System.Globalization.CultureInfo.InvariantCulture)}");
        }

        var width = r.Width == 0 ? backbone.DefaultWidth : (long)r.Width;
        var height = r.Height == 0 ? backbone.DefaultHeight : (long)r.Height;
        var m = pipeline.SizeMultiple;
        if (width % m != 0) throw new InvalidRequestException($"width: {width} is not a multiple of {m} (backbone '{backbone.Name}')");
        if (height % m != 0) throw new InvalidRequestException($"height: {height} is not a multiple of {m} (backbone '{backbone.Name}')");
        if (width * height > limits.MaxPixels)
            throw new InvalidRequestException($"width × height: {width}×{height} = {width * height} pixels exceeds the limit of {limits.MaxPixels}");

        var steps = r.NumInferenceSteps == 0 ? ServerOptions.DefaultSteps : (long)r.NumInferenceSteps;
        if (steps > limits.MaxSteps)
            throw new InvalidRequestException($"num_inference_steps: {steps} exceeds the limit of {limits.MaxSteps}");

        var numImages = r.NumImages == 0 ? 1 : (long)r.NumImages;
        if (numImages > limits.MaxImagesPerRequest)
            throw new InvalidRequestException($"num_images: {numImages} exceeds the limit of {limits.MaxImagesPerRequest}");

        if (!float.IsFinite(r.GuidanceScale))
            throw new InvalidRequestException($"guidance_scale: must be finite, got {r.GuidanceScale.ToString(System.Globalization.CultureInfo.InvariantCulture)}");

        if (r.Seeds.Count > 0 && r.Seeds.Count != numImages)
            throw new InvalidRequestException($"seeds: {r.Seeds.Count} given, but num_images is {numImages} (give one seed per image or none)");

        if (r.PriorNoise.Count > 0)
        {
            if (r.PriorNoise.Count != numImages)
                throw new InvalidRequestException($"prior_noise: {r.PriorNoise.Count} tensors given, but num_images is {numImages} (give one per image or none)");
            var f = pipeline.VaeScaleFactor;
            long[] expected = [pipeline.LatentChannels, height / f, width / f];
            for (var i = 0; i < r.PriorNoise.Count; i++)
                TensorWire.ValidateFloat32(r.PriorNoise[i], expected, $"prior_noise[{i}]");
        }

        IReadOnlyList<long>? seeds = r.Seeds.Count > 0 ? r.Seeds.ToArray() : null;
        // With neither seeds nor noise, draw the seeds here so every image stays reproducible from the response.
        if (seeds is null && r.PriorNoise.Count == 0)
            seeds = Enumerable.Range(0, (int)numImages).Select(_ => Random.Shared.NextInt64(0, 1L << 53)).ToArray();

        return new ValidatedGenerate(
            backbone, r.Prompt, r.NegativePrompt, (int)width, (int)height, (int)steps, r.GuidanceScale, (int)numImages,
            seeds, r.PriorNoise.Count > 0 ? r.PriorNoise.ToArray() : null,
            r.ReturnImageTensor, r.ReturnLatents, r.OmitPng,
            r.Adapters.Count > 0 ? r.Adapters.ToArray() : null);
    }
}
