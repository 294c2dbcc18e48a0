using System.Runtime.InteropServices;
using Google.Protobuf;
using Grpc.Core;
using RealAlign.Server.Wire;
using RealAlign.V1;
using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;
using WireTensor = RealAlign.V1.Tensor;

namespace RealAlign.Tests.Server;

public sealed class FakeServerFixture : IAsyncLifetime
{
    public FakePipeline Fake { get; } = new();
    public TestServer Server { get; private set; } = null!;
    public async Task InitializeAsync() => Server = await TestServer.StartAsync(Fake);
    public async Task DisposeAsync() => await Server.DisposeAsync();
}

/// <summary>Generate / ListBackbones against the real server with a fake backbone.</summary>
public sealed class GenerationServiceTests(FakeServerFixture fixture) : IClassFixture<FakeServerFixture>
{
    private TestServer Server => fixture.Server;

    private static float[] Floats(WireTensor t) => MemoryMarshal.Cast<byte, float>(t.Data.Span).ToArray();

    private static WireTensor NoiseTensor(float[] values, params long[] shape)
    {
        var t = new WireTensor { Dtype = "float32", Data = ByteString.CopyFrom(MemoryMarshal.AsBytes(values.AsSpan())) };
        t.Shape.AddRange(shape);
        return t;
    }

    [Fact]
    public async Task Generate_streams_progress_then_one_image_per_sample()
    {
        var request = TestServer.Valid(images: 2, steps: 3);
        request.Seeds.Add([11, 12]);
        request.ReturnImageTensor = true;
        request.ReturnLatents = true;

        var events = await Server.CollectAsync(request);

        var progress = events.Where(e => e.EventCase == GenerateEvent.EventOneofCase.Progress && e.Progress.Step > 0).Select(e => e.Progress).ToList();
        Assert.Equal([1u, 2u, 3u], progress.Select(p => p.Step));
        Assert.All(progress, p => Assert.Equal(3u, p.TotalSteps));
        var images = events.Where(e => e.EventCase == GenerateEvent.EventOneofCase.Image).Select(e => e.Image).ToList();
        Assert.Equal([0u, 1u], images.Select(i => i.Index));
        Assert.True(events.FindLastIndex(e => e.EventCase == GenerateEvent.EventOneofCase.Progress)
                    < events.FindIndex(e => e.EventCase == GenerateEvent.EventOneofCase.Image));

        foreach (var (img, seed) in images.Zip(new long[] { 11, 12 }))
        {
            Assert.Equal(seed, img.Seed);
            Assert.Equal((16u, 16u, "fake"), (img.Width, img.Height, img.Backbone));
            Assert.Equal("float32", img.PriorNoise.Dtype);
            Assert.Equal([4L, 8, 8], img.PriorNoise.Shape);
            using var expectedNoise = FakePipeline.Noise(seed, 16, 16);
            Assert.Equal(expectedNoise.data<float>().ToArray(), Floats(img.PriorNoise));

            Assert.Equal([3L, 16, 16], img.Image.Shape);
            using var expectedImage = FakePipeline.ImageOf(expectedNoise).contiguous();
            var pixels = expectedImage.data<float>().ToArray();
            Assert.Equal(pixels, Floats(img.Image));
            Assert.Equal([4L, 8, 8], img.Latents.Shape);

            using var bitmap = SKBitmap.Decode(img.ImagePng.ToByteArray());
            Assert.NotNull(bitmap);
            Assert.Equal((16, 16), (bitmap.Width, bitmap.Height));
            for (var y = 0; y < 16; y++)
                for (var x = 0; x < 16; x++)
                {
                    var c = bitmap.GetPixel(x, y);
                    Assert.Equal(PngEncoder.Quantise(pixels[y * 16 + x]), c.Red);
                    Assert.Equal(PngEncoder.Quantise(pixels[256 + y * 16 + x]), c.Green);
                    Assert.Equal(PngEncoder.Quantise(pixels[512 + y * 16 + x]), c.Blue);
                }
        }
        Assert.Equal(4.5, fixture.Fake.LastOptions!.GuidanceScale, 6);
        Assert.Equal("a photo of a cat", fixture.Fake.LastOptions.Prompt);
    }

    [Fact]
    public async Task Zero_fields_take_the_defaults_and_a_drawn_seed_reproduces_its_noise()
    {
        var events = await Server.CollectAsync(new GenerateRequest { Backbone = "fake", OmitPng = true });

        var steps = events.Count(e => e.EventCase == GenerateEvent.EventOneofCase.Progress && e.Progress.Step > 0);
        Assert.Equal(28, steps);
        var image = Assert.Single(events, e => e.EventCase == GenerateEvent.EventOneofCase.Image).Image;
        Assert.Equal((16u, 16u), (image.Width, image.Height));
        Assert.True(image.ImagePng.IsEmpty);
        Assert.Null(image.Image);
        Assert.Null(image.Latents);

        var again = TestServer.Valid();
        again.Seeds.Add(image.Seed);
        var replay = (await Server.CollectAsync(again)).Single(e => e.EventCase == GenerateEvent.EventOneofCase.Image).Image;
        Assert.Equal(image.PriorNoise.Data, replay.PriorNoise.Data);
    }

    [Fact]
    public async Task Explicit_prior_noise_is_used_as_given()
    {
        var values = Enumerable.Range(0, 4 * 8 * 8).Select(i => (float)Math.Sin(i)).ToArray();
        var request = TestServer.Valid();
        request.PriorNoise.Add(NoiseTensor(values, 4, 8, 8));

        var image = (await Server.CollectAsync(request)).Single(e => e.EventCase == GenerateEvent.EventOneofCase.Image).Image;

        Assert.Equal(values, Floats(image.PriorNoise));
        Assert.Equal(0, image.Seed);
    }

    [Fact]
    public async Task ListBackbones_describes_the_resident_backbone()
    {
        var response = await Server.Generation.ListBackbonesAsync(new ListBackbonesRequest());
        var info = Assert.Single(response.Backbones);
        Assert.Equal(("fake", "fake", "test"), (info.Name, info.Family, info.Source));
        Assert.Equal((4u, 2u, 4u), (info.LatentChannels, info.VaeScaleFactor, info.SizeMultiple));
        Assert.Equal((16u, 16u), (info.DefaultWidth, info.DefaultHeight));
    }

    public static TheoryData<string, StatusCode, string> BadRequests() => new()
    {
        { "unknown-backbone", StatusCode.NotFound, "fake" },
        { "width-not-multiple", StatusCode.InvalidArgument, "width: 18 is not a multiple of 4" },
        { "height-not-multiple", StatusCode.InvalidArgument, "height: 6 is not a multiple of 4" },
        { "too-many-pixels", StatusCode.InvalidArgument, "exceeds the limit of 65536" },
        { "too-many-steps", StatusCode.InvalidArgument, "num_inference_steps: 201 exceeds the limit of 200" },
        { "too-many-images", StatusCode.InvalidArgument, "num_images: 5 exceeds the limit of 4" },
        { "guidance-nan", StatusCode.InvalidArgument, "guidance_scale" },
        { "guidance-inf", StatusCode.InvalidArgument, "guidance_scale" },
        { "seed-count", StatusCode.InvalidArgument, "seeds: 1 given, but num_images is 2" },
        { "noise-count", StatusCode.InvalidArgument, "prior_noise: 1 tensors given, but num_images is 2" },
        { "noise-dtype", StatusCode.InvalidArgument, "prior_noise[0]: dtype must be float32, got 'float16'" },
        { "noise-unknown-dtype", StatusCode.InvalidArgument, "prior_noise[0]: dtype must be float32, got 'complex64'" },
        { "noise-shape", StatusCode.InvalidArgument, "prior_noise[1]: expected shape [4, 8, 8], got [4, 8, 9]" },
        { "noise-bytes", StatusCode.InvalidArgument, "prior_noise[0]: 1020 bytes of data, but shape [4, 8, 8]" },
        { "noise-negative-dim", StatusCode.InvalidArgument, "prior_noise[0]: dimension 1 is negative" },
        { "noise-nan", StatusCode.InvalidArgument, "prior_noise[0]: element 5 is NaN" },
        { "noise-inf", StatusCode.InvalidArgument, "prior_noise[0]: element 7 is Infinity" },
        { "adapters", StatusCode.Unimplemented, "adapters" },
    };

    private static GenerateRequest Bad(string kind)
    {
        var r = TestServer.Valid();
        var good = new float[4 * 8 * 8];
        switch (kind)
        {
            case "unknown-backbone": r.Backbone = "sd99"; break;
            case "width-not-multiple": r.Width = 18; break;
            case "height-not-multiple": r.Height = 6; break;
            case "too-many-pixels": r.Width = 512; r.Height = 512; break;
            case "too-many-steps": r.NumInferenceSteps = 201; break;
            case "too-many-images": r.NumImages = 5; break;
            case "guidance-nan": r.GuidanceScale = float.NaN; break;
            case "guidance-inf": r.GuidanceScale = float.PositiveInfinity; break;
            case "seed-count": r.NumImages = 2; r.Seeds.Add(1); break;
            case "noise-count": r.NumImages = 2; r.PriorNoise.Add(NoiseTensor(good, 4, 8, 8)); break;
            case "noise-dtype":
                var half = NoiseTensor(new float[2 * 8 * 8], 4, 8, 8);
                half.Dtype = "float16";
                r.PriorNoise.Add(half);
                break;
            case "noise-unknown-dtype":
                var odd = NoiseTensor(good, 4, 8, 8);
                odd.Dtype = "complex64";
                r.PriorNoise.Add(odd);
                break;
            case "noise-shape":
                r.NumImages = 2;
                r.PriorNoise.Add(NoiseTensor(good, 4, 8, 8));
                r.PriorNoise.Add(NoiseTensor(new float[4 * 8 * 9], 4, 8, 9));
                break;
            case "noise-bytes":
                var shortData = NoiseTensor(good, 4, 8, 8);
                shortData.Data = ByteString.CopyFrom(shortData.Data.Span[..1020]);
                r.PriorNoise.Add(shortData);
                break;
            case "noise-negative-dim": r.PriorNoise.Add(NoiseTensor([], 4, -8, 8)); break;
            case "noise-nan":
                var nan = (float[])good.Clone(); nan[5] = float.NaN;
                r.PriorNoise.Add(NoiseTensor(nan, 4, 8, 8));
                break;
            case "noise-inf":
                var inf = (float[])good.Clone(); inf[7] = float.PositiveInfinity;
                r.PriorNoise.Add(NoiseTensor(inf, 4, 8, 8));
                break;
            case "adapters": r.Adapters.Add(new AdapterRef { Name = "style", Scale = 1 }); break;
            default: throw new ArgumentException(kind);
        }
        return r;
    }

    [Theory]
    [MemberData(nameof(BadRequests))]
    public async Task Bad_requests_get_the_right_status_and_the_next_request_succeeds(string kind, StatusCode code, string message)
    {
        var callsBefore = fixture.Fake.Calls;
        var e = await Assert.ThrowsAsync<RpcException>(() => Server.CollectAsync(Bad(kind)));
        Assert.Equal(code, e.StatusCode);
        Assert.Contains(message, e.Status.Detail);
        Assert.Equal(callsBefore, fixture.Fake.Calls); // rejected before reaching the device

        var ok = await Server.CollectAsync(TestServer.Valid());
        Assert.Single(ok, ev => ev.EventCase == GenerateEvent.EventOneofCase.Image);
    }
}
