using RealAlign.Core.Pipelines;
using RealAlign.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Tests.Pipelines;

/// <summary>sd3_pipeline end to end: prompt embeddings, every step's latents and transformer output, final latents, decode, image.</summary>
public class Sd3PipelineTests
{
    [Fact]
    public void MatchesDiffusersEndToEnd()
    {
        using var c = Fixtures.Case("sd3_pipeline");
        using var pipe = StableDiffusion3Pipeline.FromPretrained(c.PathOf(c.Json["pipeline_dir"]!.GetValue<string>()));
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var o = PipelineCases.OptionsFrom(c, c.In("latents"));

        var pos = pipe.EncodePrompt([o.Prompt]);
        var neg = pipe.EncodePrompt([o.NegativePrompt]);
        c.AssertClose("prompt_embeds", pos.PromptEmbeds);
        c.AssertClose("pooled_prompt_embeds", pos.PooledPromptEmbeds);
        c.AssertClose("negative_prompt_embeds", neg.PromptEmbeds);
        c.AssertClose("negative_pooled_prompt_embeds", neg.PooledPromptEmbeds);

        var sched = pipe.CreateScheduler(o.NumInferenceSteps, o.Height / pipe.VaeScaleFactor, o.Width / pipe.VaeScaleFactor);
        c.AssertClose("timesteps", tensor(sched.Timesteps.Select(t => (float)t).ToArray()));

        var stepLatents = new List<Tensor>();
        var stepOut = new List<Tensor>();
        var samples = pipe.Generate(o, null, CancellationToken.None, (i, lat, raw) =>
        {
            stepLatents.Add(lat.clone().MoveToOuterDisposeScope());
            stepOut.Add(raw.clone().MoveToOuterDisposeScope());
        });
        c.AssertClose("step_latents", stack(stepLatents, 0));
        c.AssertClose("step_transformer_out", stack(stepOut, 0));
        c.AssertClose("final_latents", stack(samples.Select(s => s.Latents).ToArray(), 0));
        var fl = c.Out("final_latents");
        c.AssertClose("decoded_raw", pipe.Vae.Decode(fl / pipe.Vae.ScalingFactor + pipe.Vae.ShiftFactor));
        c.AssertClose("image", stack(samples.Select(s => s.Image).ToArray(), 0));
        Assert.True(samples[0].PriorNoise.allclose(c.In("latents")[0], 0, 0), "returned prior noise must be the given x_T");
        foreach (var s in samples) s.Dispose();
    }
}
