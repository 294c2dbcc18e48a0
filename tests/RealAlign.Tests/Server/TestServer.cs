using System.Net.Http;
using Grpc.Core;
using Grpc.Health.V1;
using Grpc.Net.Client;
using Microsoft.Extensions.Logging;
using RealAlign.Core.Pipelines;
using RealAlign.Server.Backbones;
using RealAlign.Server.Hosting;
using RealAlign.Server.Options;
using RealAlign.V1;
using TorchSharp;
using static TorchSharp.torch;
using Tensor = TorchSharp.torch.Tensor;

namespace RealAlign.Tests.Server;

/// <summary>
/// A deterministic stand-in for an SD3 pipeline so the server can be tested without model weights:
/// x_T = randn([4, H/2, W/2]) from a CPU generator seeded with the image's seed, image = sigmoid(x_T[:3])
/// upsampled ×2, latents = x_T / 2. Reports every step and checks the token between steps.
/// </summary>
public sealed class FakePipeline : ITextToImagePipeline
{
    public const int Channels = 4, Factor = 2, Multiple = 4;

    /// <summary>Sleep per step (cancellable), to make requests slow enough to queue or cancel.</summary>
    public TimeSpan StepDelay { get; init; }
    public int Calls => _calls;
    public int Cancelled => _cancelled;
    public GenerationOptions? LastOptions { get; private set; }
    public int? LastThreadId { get; private set; }
    private int _calls, _cancelled;

    public string Family => "fake";
    public int LatentChannels => Channels;
    public int VaeScaleFactor => Factor;
    public int SizeMultiple => Multiple;
    public Device Device => CPU;

    public static Tensor Noise(long seed, int height, int width)
    {
        var g = new torch.Generator(unchecked((ulong)seed), CPU);
        return torch.randn([Channels, height / Factor, width / Factor], ScalarType.Float32, CPU, generator: g);
    }

    public static Tensor ImageOf(Tensor noise) =>
        torch.sigmoid(noise[TensorIndex.Slice(0, 3)]).repeat_interleave(Factor, 1).repeat_interleave(Factor, 2);

    public IReadOnlyList<GeneratedSample> Generate(GenerationOptions options, Action<StepProgress>? onStep, CancellationToken ct)
    {
        Interlocked.Increment(ref _calls);
        LastOptions = options;
        LastThreadId = Environment.CurrentManagedThreadId;
        try
        {
            for (var step = 1; step <= options.NumInferenceSteps; step++)
            {
                ct.ThrowIfCancellationRequested();
                if (StepDelay > TimeSpan.Zero) ct.WaitHandle.WaitOne(StepDelay);
                ct.ThrowIfCancellationRequested();
                onStep?.Invoke(new StepProgress(step, options.NumInferenceSteps, 1000.0 * (options.NumInferenceSteps - step + 1) / options.NumInferenceSteps));
            }
        }
        catch (OperationCanceledException)
        {
            Interlocked.Increment(ref _cancelled);
            throw;
        }
        var samples = new List<GeneratedSample>();
        for (var i = 0; i < options.NumImages; i++)
        {
            var seed = options.Seeds?[i] ?? 0;
            var noise = options.PriorNoise is { } given ? given[i].clone() : Noise(seed, options.Height, options.Width);
            samples.Add(new GeneratedSample
            {
                Index = i, Seed = seed, PriorNoise = noise, Latents = noise / 2, Image = ImageOf(noise),
            });
        }
        return samples;
    }

    public void Dispose() { }
}

/// <summary>The real server (Kestrel, loopback, free ports) around fake backbones, plus clients for it.</summary>
public sealed class TestServer : IAsyncDisposable
{
    public const string FakeName = "fake";
    /// <summary>Default size of the fake backbone: sample size 8 × factor 2.</summary>
    public const int DefaultSide = 16;

    public ServerHost Host { get; }
    public GrpcChannel Channel { get; }
    public Generation.GenerationClient Generation { get; }
    public Health.HealthClient Health { get; }

    private TestServer(ServerHost host)
    {
        Host = host;
        Channel = GrpcChannel.ForAddress(host.GrpcAddress, new GrpcChannelOptions
        {
            MaxReceiveMessageSize = 256 * 1024 * 1024,
            MaxSendMessageSize = 256 * 1024 * 1024,
        });
        Generation = new Generation.GenerationClient(Channel);
        Health = new Health.HealthClient(Channel);
    }

    public static ServerOptions Options(int maxQueue = 8) => new()
    {
        GrpcPort = 0,
        MetricsPort = 0,
        Device = "cpu",
        MaxQueue = maxQueue,
        MaxSteps = 200,
        MaxImagesPerRequest = 4,
        MaxPixels = 256 * 256,
    };

    public static Task<TestServer> StartAsync(FakePipeline fake, ServerOptions? options = null, bool waitUntilServing = true) =>
        StartAsync([new BackboneRegistration(FakeName, "test", _ => fake, DefaultSampleSize: 8)], options, waitUntilServing);

    public static async Task<TestServer> StartAsync(IReadOnlyList<BackboneRegistration> backbones, ServerOptions? options = null, bool waitUntilServing = true)
    {
        var host = await ServerHost.StartAsync(options ?? Options(), backbones, l => l.SetMinimumLevel(LogLevel.Warning));
        var server = new TestServer(host);
        if (waitUntilServing)
        {
            var until = DateTime.UtcNow.AddSeconds(30);
            while (!host.Registry.IsReady)
            {
                if (host.Registry.LoadError is { } e) throw new InvalidOperationException("backbone load failed", e);
                if (DateTime.UtcNow > until) throw new TimeoutException("backbones did not load in 30 s");
                await Task.Delay(10);
            }
        }
        return server;
    }

    public static GenerateRequest Valid(int images = 1, int steps = 2) => new()
    {
        Backbone = FakeName,
        Prompt = "a photo of a cat",
        Width = 16,
        Height = 16,
        NumInferenceSteps = (uint)steps,
        GuidanceScale = 4.5f,
        NumImages = (uint)images,
    };

    /// <summary>Runs a request to completion and returns every event.</summary>
    public async Task<List<GenerateEvent>> CollectAsync(GenerateRequest request, CancellationToken ct = default, DateTime? deadline = null)
    {
        using var call = Generation.Generate(request, deadline: deadline, cancellationToken: ct);
        var events = new List<GenerateEvent>();
        await foreach (var e in call.ResponseStream.ReadAllAsync(ct)) events.Add(e);
        return events;
    }

    public async Task<string> GetMetricsTextAsync()
    {
        using var http = new HttpClient();
        return await http.GetStringAsync(new Uri(Host.MetricsAddress, "metrics"));
    }

    public async ValueTask DisposeAsync()
    {
        Channel.Dispose();
        await Host.DisposeAsync();
    }
}
