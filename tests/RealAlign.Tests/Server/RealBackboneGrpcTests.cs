using System.Diagnostics;
using Grpc.Core;
using RealAlign.Core.Pipelines;
using RealAlign.Server.Backbones;
using RealAlign.Server.Wire;
using RealAlign.Tests.Infrastructure;
using RealAlign.V1;
using static TorchSharp.torch;

namespace RealAlign.Tests.Server;

/// <summary>Generation through the gRPC API on real backbones: the sd3_pipeline golden folder and the embedded tiny default.</summary>
[Collection(MemoryMeasurementCollection.Name)]
public class RealBackboneGrpcTests
{
    private static async Task<TestServer> StartAsync(string name, string source, Func<Device, ITextToImagePipeline> factory, int? sampleSize = null)
    {
        return await TestServer.StartAsync([new BackboneRegistration(name, source, factory, sampleSize)], TestServer.Options(maxQueue: 8));
    }

    private static List<GeneratedImage> Images(List<GenerateEvent> events) =>
        events.Where(e => e.EventCase == GenerateEvent.EventOneofCase.Image).Select(e => e.Image).ToList();

    [Fact]
    public async Task Sd3PipelineFixtureThroughGrpcMatchesDiffusers()
    {
        using var c = Fixtures.Case("sd3_pipeline");
        var folder = c.PathOf(c.Json["pipeline_dir"]!.GetValue<string>());
        await using var server = await StartAsync("fx", folder, d => StableDiffusion3Pipeline.FromPretrained(folder, d));
        var a = c.Json["call_args"]!.AsObject();
        using var latents = c.In("latents");
        var req = new GenerateRequest
        {
            Backbone = "fx",
            Prompt = a["prompt"]![0]!.GetValue<string>(),
            NegativePrompt = a["negative_prompt"]![0]!.GetValue<string>(),
            Width = a["width"]!.GetValue<uint>(), Height = a["height"]!.GetValue<uint>(),
            NumInferenceSteps = a["num_inference_steps"]!.GetValue<uint>(),
            GuidanceScale = a["guidance_scale"]!.GetValue<float>(),
            NumImages = 1, ReturnImageTensor = true, ReturnLatents = true,
        };
        req.PriorNoise.Add(TensorWire.FromTorch(latents[0]));
        var events = await server.CollectAsync(req);
        var img = Assert.Single(Images(events));
        Assert.Equal(req.NumInferenceSteps, (uint)events.Count(e => e.EventCase == GenerateEvent.EventOneofCase.Progress && e.Progress.QueuePosition == 0));
        using var image = TensorWire.ToTorch(img.Image, "image").unsqueeze(0);
        using var fl = TensorWire.ToTorch(img.Latents, "latents").unsqueeze(0);
        c.AssertClose("image", image);
        c.AssertClose("final_latents", fl);
        using var noise = TensorWire.ToTorch(img.PriorNoise, "prior_noise");
        Assert.True(noise.allclose(latents[0], 0, 0), "prior_noise must echo the x_T sent");
    }

    [Fact]
    public async Task TinyDefaultSeedsAndPriorNoiseRoundTrip()
    {
        await using var server = await StartAsync(TinySd3.Name, "embedded", d => TinySd3.Create(d), (int)TinySd3.TransformerConfig.SampleSize);
        GenerateRequest Req() => new() { Backbone = TinySd3.Name, Prompt = "a lighthouse at dusk", NegativePrompt = "blurry", Width = 32, Height = 32, NumInferenceSteps = 3, GuidanceScale = 5f };

        var r1 = Req(); r1.NumImages = 2; r1.Seeds.Add([11, 12]);
        var first = Images(await server.CollectAsync(r1));
        Assert.Equal(2, first.Count);
        Assert.NotEqual(first[0].PriorNoise.Data, first[1].PriorNoise.Data);
        Assert.NotEqual(first[0].ImagePng, first[1].ImagePng);

        var r2 = Req(); r2.NumImages = 1; r2.Seeds.Add(12);
        var again = Assert.Single(Images(await server.CollectAsync(r2)));
        Assert.Equal(first[1].ImagePng, again.ImagePng); // same seed → byte-identical PNG

        var r3 = Req(); r3.NumImages = 1; r3.PriorNoise.Add(again.PriorNoise);
        var fromNoise = Assert.Single(Images(await server.CollectAsync(r3)));
        Assert.Equal(again.ImagePng, fromNoise.ImagePng); // returned x_T regenerates the image
        Assert.Equal(again.PriorNoise.Data, fromNoise.PriorNoise.Data);
    }

    /// <summary>300 sequential tiny generations through the server: resident memory stays flat (within 5%).</summary>
    [Fact]
    public async Task ResidentMemoryStaysFlatOver300Generations()
    {
        await using var server = await StartAsync(TinySd3.Name, "embedded", d => TinySd3.Create(d), (int)TinySd3.TransformerConfig.SampleSize);
        var req = new GenerateRequest { Backbone = TinySd3.Name, Prompt = "a cat", Width = 32, Height = 32, NumInferenceSteps = 2, GuidanceScale = 3f, ReturnImageTensor = true, ReturnLatents = true };
        long Rss() { GC.Collect(); GC.WaitForPendingFinalizers(); GC.Collect(); var p = Process.GetCurrentProcess(); p.Refresh(); return p.WorkingSet64; }
        for (int i = 0; i < 30; i++) { req.Seeds.Clear(); req.Seeds.Add(i); await server.CollectAsync(req); }
        long baseline = Rss();
        for (int i = 0; i < 300; i++) { req.Seeds.Clear(); req.Seeds.Add(1000 + i); Assert.Single(Images(await server.CollectAsync(req))); }
        long end = Rss();
        double growth = (end - baseline) / (double)baseline;
        Assert.True(growth < 0.05, $"RSS grew {growth:P1} over 300 generations ({baseline >> 20} MiB → {end >> 20} MiB)");
    }
}
