using System.Diagnostics;
using System.Threading.Channels;
using Grpc.Core;
using RealAlign.Core.Lora;
using RealAlign.Core.Models;
using RealAlign.Core.Pipelines;
using RealAlign.Server.Backbones;
using RealAlign.Server.Execution;
using RealAlign.Server.Observability;
using RealAlign.Server.Options;
using RealAlign.Server.Wire;
using RealAlign.V1;
using static TorchSharp.torch;
using WireTensor = RealAlign.V1.Tensor;

namespace RealAlign.Server.Services;

/// <summary>
/// realalign.v1.Generation: validates at the edge, runs the sampler on the device thread and streams
/// progress and images back. Errors are thrown as domain exceptions; ExceptionInterceptor maps them.
/// </summary>
public sealed class GenerationService(
    BackboneRegistry registry,
    DeviceExecutor executor,
    ServerOptions options,
    ServerMetrics metrics,
    AdapterBackboneBinder adapterBinder) : Generation.GenerationBase
{
    /// <summary>What leaves the device thread: managed copies only, no tensors.</summary>
    private sealed record SampleResult(int Index, long Seed, WireTensor PriorNoise, float[] Image, WireTensor? Latents);

    public override async Task Generate(GenerateRequest request, IServerStreamWriter<GenerateEvent> responseStream, ServerCallContext context)
    {
        var log = RequestLog.Of(context);
        log.Backbone = request.Backbone;
        await registry.WaitUntilLoadedAsync(request.Backbone, context.CancellationToken);
        var req = GenerateRequestValidator.Validate(request, registry, options);
        (log.Images, log.Steps, log.Width, log.Height) = (req.NumImages, req.Steps, req.Width, req.Height);

        var ct = context.CancellationToken; // fires on client cancellation and on deadline
        var events = Channel.CreateUnbounded<GenerateEvent>(new UnboundedChannelOptions { SingleReader = true });
        var stepSeconds = metrics.StepDuration.WithLabels(req.Backbone.Name);

        // Adapter versions are captured now, at request start: a hot swap while this request waits or
        // runs does not change it. The lease is released when the device work has finished (not when
        // this call returns: a cancelled call may return while its work item is still running).
        var (lease, appliedAdapters, adapterScope) = AcquireAdapters(req);
        Task<IReadOnlyList<SampleResult>> run;
        try
        {
            run = executor.RunAsync(
                token => RunOnDevice(req, lease, adapterScope, events.Writer, stepSeconds, token),
                ct,
                onQueued: ahead =>
                {
                    if (ahead > 0)
                        events.Writer.TryWrite(new GenerateEvent { Progress = new Progress { TotalSteps = (uint)req.Steps, QueuePosition = (uint)ahead } });
                });
        }
        catch
        {
            lease?.Dispose();
            throw;
        }
        _ = run.ContinueWith(_ => { events.Writer.TryComplete(); lease?.Dispose(); }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);

        await foreach (var e in events.Reader.ReadAllAsync(ct))
            await responseStream.WriteAsync(e, ct);
        var samples = await run;

        // PNG encoding is CPU work for the thread pool, not for the device thread.
        var pngs = samples
            .Select(s => req.OmitPng ? Task.FromResult<byte[]?>(null) : Task.Run<byte[]?>(() => PngEncoder.Encode(s.Image, req.Height, req.Width), ct))
            .ToArray();
        for (var i = 0; i < samples.Count; i++)
        {
            var s = samples[i];
            var image = new GeneratedImage
            {
                Index = (uint)s.Index,
                Seed = s.Seed,
                PriorNoise = s.PriorNoise,
                Width = (uint)req.Width,
                Height = (uint)req.Height,
                Backbone = req.Backbone.Name,
            };
            if (await pngs[i] is { } png) image.ImagePng = Google.Protobuf.ByteString.CopyFrom(png);
            if (req.ReturnImageTensor) image.Image = TensorWire.FromFloats(s.Image, [3, req.Height, req.Width]);
            if (s.Latents is not null) image.Latents = s.Latents;
            image.Adapters.AddRange(appliedAdapters);
            await responseStream.WriteAsync(new GenerateEvent { Image = image }, ct);
            metrics.ImagesGenerated.WithLabels(req.Backbone.Name).Inc();
        }
    }

    /// <summary>
    /// The request's adapters resolved to their current versions (NOT_FOUND names the unknown ones),
    /// and how the response reports them (<c>name@version</c>, scale).
    /// </summary>
    private (AdapterLease? Lease, IReadOnlyList<AdapterRef> Applied, LoraTargetSet? Scope) AcquireAdapters(ValidatedGenerate req)
    {
        if (req.Adapters is null) return (null, [], null);
        var backbone = adapterBinder.Ensure(req.Backbone);
        var lease = adapterBinder.Adapters.Acquire(req.Adapters.Select(a => a.Name));
        try
        {
            foreach (var v in lease.Versions)
                if (v.Backbone != req.Backbone.Name)
                    throw new InvalidRequestException($"adapters: '{v.Name}' was loaded for backbone '{v.Backbone}', not '{req.Backbone.Name}'");
            return (lease, req.Adapters.Select(a => new AdapterRef { Name = $"{a.Name}@{lease[a.Name].Version}", Scale = a.Scale }).ToList(), backbone.Targets);
        }
        catch
        {
            lease.Dispose();
            throw;
        }
    }

    /// <summary>Runs on the device thread inside a dispose scope and no_grad; never awaits.</summary>
    private static IReadOnlyList<SampleResult> RunOnDevice(
        ValidatedGenerate req, AdapterLease? lease, LoraTargetSet? adapterScope, ChannelWriter<GenerateEvent> events, Prometheus.Histogram.Child stepSeconds, CancellationToken ct)
    {
        ct.ThrowIfCancellationRequested();
        var noise = req.PriorNoise?.Select((t, i) => TensorWire.ToTorch(t, $"prior_noise[{i}]")).ToList();
        var generation = new GenerationOptions
        {
            Prompt = req.Prompt,
            NegativePrompt = req.NegativePrompt,
            Width = req.Width,
            Height = req.Height,
            NumInferenceSteps = req.Steps,
            GuidanceScale = req.GuidanceScale,
            NumImages = req.NumImages,
            Seeds = req.Seeds,
            PriorNoise = noise,
        };
        var clock = Stopwatch.StartNew();
        void OnStep(StepProgress p)
        {
            stepSeconds.Observe(clock.Elapsed.TotalSeconds);
            clock.Restart();
            events.TryWrite(new GenerateEvent
            {
                Progress = new Progress { Step = (uint)p.Step, TotalSteps = (uint)p.TotalSteps, Timestep = (float)p.Timestep },
            });
        }

        // LoRA is applied by a hook on the transformer's linear layers for this call only (every image
        // row uses the request's adapters; the base weights are never modified; the text encoders and
        // VAE, which run on this thread too, are outside the hook's scope).
        using var hook = lease?.CreateHook(req.Adapters!.Select(a => (a.Name, (double)a.Scale)).ToList(), adapterScope);
        IReadOnlyList<GeneratedSample> samples;
        using (LinearHooks.Use(hook))
            samples = req.Backbone.Pipeline.Generate(generation, OnStep, ct);
        try
        {
            if (samples.Count != req.NumImages)
                throw new InvalidOperationException($"pipeline returned {samples.Count} samples for num_images {req.NumImages}");
            long[] imageShape = [3, req.Height, req.Width];
            foreach (var s in samples)
                if (!s.Image.shape.SequenceEqual(imageShape))
                    throw new InvalidOperationException($"pipeline returned image {s.Index} of shape {TensorWire.Format(s.Image.shape)}, expected {TensorWire.Format(imageShape)}");
            return samples.Select(s => new SampleResult(
                s.Index,
                req.Seeds?[s.Index] ?? 0, // proto: 0 for explicit prior_noise without a seed
                TensorWire.FromTorch(s.PriorNoise),
                TensorWire.ToFloats(s.Image),
                req.ReturnLatents ? TensorWire.FromTorch(s.Latents) : null)).ToList();
        }
        finally
        {
            foreach (var s in samples) s.Dispose();
        }
    }

    public override Task<ListBackbonesResponse> ListBackbones(ListBackbonesRequest request, ServerCallContext context)
    {
        var response = new ListBackbonesResponse();
        response.Backbones.AddRange(registry.Loaded.OrderBy(b => b.Name, StringComparer.Ordinal).Select(b => b.ToInfo()));
        return Task.FromResult(response);
    }
}
