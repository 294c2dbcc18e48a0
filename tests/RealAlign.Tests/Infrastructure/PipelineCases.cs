using RealAlign.Core.Pipelines;
using static TorchSharp.torch;

namespace RealAlign.Tests.Infrastructure;

/// <summary>The sd3_pipeline-style cases' <c>call_args</c> as pipeline options, one sample per stored x_T.</summary>
public static class PipelineCases
{
    public static GenerationOptions OptionsFrom(GoldenCase c, Tensor priorNoise)
    {
        var a = c.Json["call_args"]!.AsObject();
        return new GenerationOptions
        {
            Prompt = a["prompt"]![0]!.GetValue<string>(),
            NegativePrompt = a["negative_prompt"]![0]!.GetValue<string>(),
            GuidanceScale = a["guidance_scale"]!.GetValue<double>(),
            NumInferenceSteps = a["num_inference_steps"]!.GetValue<int>(),
            Height = a["height"]!.GetValue<int>(),
            Width = a["width"]!.GetValue<int>(),
            NumImages = (int)priorNoise.shape[0],
            PriorNoise = Enumerable.Range(0, (int)priorNoise.shape[0]).Select(i => priorNoise[i]).ToArray(),
        };
    }
}
