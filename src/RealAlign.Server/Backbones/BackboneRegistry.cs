using System.Text.Json.Nodes;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using RealAlign.Core.Pipelines;
using RealAlign.Server.Execution;
using RealAlign.V1;
using static TorchSharp.torch;

namespace RealAlign.Server.Backbones;

/// <summary>
/// How to bring one backbone into memory. <paramref name="Factory"/> runs once, on the device thread.
/// <paramref name="DefaultSampleSize"/> is diffusers' <c>default_sample_size</c> (latent pixels; the
/// default image side is that × the VAE factor); null reads <c>transformer/config.json</c>'s
/// <c>sample_size</c> from <paramref name="Source"/> when it is a folder, else 128 (SD3's).
/// </summary>
public sealed record BackboneRegistration(
    string Name,
    string Source,
    Func<Device, ITextToImagePipeline> Factory,
    int? DefaultSampleSize = null);

/// <summary>A resident backbone.</summary>
public sealed class Backbone
{
    public required string Name { get; init; }
    public required string Source { get; init; }
    public required ITextToImagePipeline Pipeline { get; init; }
    public required int DefaultWidth { get; init; }
    public required int DefaultHeight { get; init; }

    public BackboneInfo ToInfo() => new()
    {
        Name = Name,
        Family = Pipeline.Family,
        Source = Source,
        LatentChannels = (uint)Pipeline.LatentChannels,
        VaeScaleFactor = (uint)Pipeline.VaeScaleFactor,
        SizeMultiple = (uint)Pipeline.SizeMultiple,
        DefaultWidth = (uint)DefaultWidth,
        DefaultHeight = (uint)DefaultHeight,
    };
}

/// <summary>
/// The backbones this server keeps resident. Loaded once at start-up (<see cref="LoadAsync"/>, on the
/// device thread); until then lookups answer UNAVAILABLE and the health service NOT_SERVING.
/// </summary>
public sealed class BackboneRegistry : IDisposable
{
    private readonly IReadOnlyList<BackboneRegistration> _registrations;
    private readonly DeviceExecutor _executor;
    private readonly ILogger<BackboneRegistry> _log;
    private volatile IReadOnlyDictionary<string, Backbone> _loaded = new Dictionary<string, Backbone>();
    private volatile bool _ready;
    // Completes when loading has finished (either way): requests that arrive while the server is still
    // loading wait for it instead of failing, so a client may call as soon as the port accepts connections.
    private readonly TaskCompletionSource _loadFinished = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public BackboneRegistry(IReadOnlyList<BackboneRegistration> registrations, DeviceExecutor executor, ILogger<BackboneRegistry> log)
    {
        var dup = registrations.GroupBy(r => r.Name).FirstOrDefault(g => g.Count() > 1);
        if (dup is not null) throw new ArgumentException($"backbone '{dup.Key}' is registered twice");
        _registrations = registrations;
        _executor = executor;
        _log = log;
    }

    public bool IsReady => _ready;
    /// <summary>Set when loading failed; the host stops and Program exits non-zero.</summary>
    public Exception? LoadError { get; private set; }
    public IReadOnlyCollection<Backbone> Loaded => _loaded.Values.ToList();
    public IEnumerable<string> Names => _registrations.Select(r => r.Name);

    /// <summary>The backbone called <paramref name="name"/>, or NOT_FOUND / UNAVAILABLE.</summary>
    public Backbone Get(string name)
    {
        if (_loaded.TryGetValue(name, out var b)) return b;
        if (!_ready && _registrations.Any(r => r.Name == name))
            throw new NotReadyException(LoadError is null
                ? $"backbone '{name}' is still loading"
                : $"backbone '{name}' failed to load: {LoadError.Message}");
        throw new BackboneNotFoundException(name, _registrations.Select(r => r.Name));
    }

    /// <summary>Waits (within the caller's deadline) until the backbones have finished loading.</summary>
    public async Task WaitUntilLoadedAsync(string name, CancellationToken ct)
    {
        if (_ready || _loaded.ContainsKey(name) || !_registrations.Any(r => r.Name == name)) return;
        try { await _loadFinished.Task.WaitAsync(ct); }
        catch (OperationCanceledException) when (ct.IsCancellationRequested) { }
    }

    public async Task LoadAsync(CancellationToken ct)
    {
        var loaded = new Dictionary<string, Backbone>();
        try
        {
            foreach (var r in _registrations)
            {
                var started = DateTime.UtcNow;
                _log.LogInformation("Loading backbone {Backbone} from {Source} on {Device}", r.Name, r.Source, _executor.Device);
                // Unscoped: the weights must outlive this work item.
                var pipeline = await _executor.RunAsync(_ => r.Factory(_executor.Device), ct, scoped: false);
                var side = (r.DefaultSampleSize ?? SampleSizeOf(r.Source) ?? 128) * pipeline.VaeScaleFactor;
                loaded[r.Name] = new Backbone
                {
                    Name = r.Name, Source = r.Source, Pipeline = pipeline, DefaultWidth = side, DefaultHeight = side,
                };
                _loaded = new Dictionary<string, Backbone>(loaded);
                _log.LogInformation("Loaded backbone {Backbone} ({Family}, latent channels {Channels}, VAE factor {Factor}, default {Side}x{Side}) in {Seconds:F1}s",
                    r.Name, pipeline.Family, pipeline.LatentChannels, pipeline.VaeScaleFactor, side, side, (DateTime.UtcNow - started).TotalSeconds);
            }
            _ready = true;
            _loadFinished.TrySetResult();
        }
        catch (Exception e)
        {
            LoadError = e;
            _loadFinished.TrySetResult();
            throw;
        }
    }

    private static int? SampleSizeOf(string source)
    {
        var config = Path.Combine(source, "transformer", "config.json");
        if (!File.Exists(config)) return null;
        return JsonNode.Parse(File.ReadAllText(config))?["sample_size"]?.GetValue<int>();
    }

    public void Dispose()
    {
        foreach (var b in _loaded.Values) b.Pipeline.Dispose();
        _loaded = new Dictionary<string, Backbone>();
        _ready = false;
    }
}

/// <summary>Loads the registry after the host started, so health can report NOT_SERVING meanwhile.</summary>
public sealed class BackboneLoader(BackboneRegistry registry, IHostApplicationLifetime lifetime, ILogger<BackboneLoader> log) : BackgroundService
{
    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        try
        {
            // Load once Kestrel is listening: a failure can then stop the host cleanly, and health
            // answers NOT_SERVING while the weights come in.
            var started = new TaskCompletionSource();
            using (lifetime.ApplicationStarted.Register(() => started.TrySetResult()))
            using (stoppingToken.Register(() => started.TrySetCanceled(stoppingToken)))
                await started.Task;
            await registry.LoadAsync(stoppingToken);
            log.LogInformation("All backbones loaded: {Names}; serving", string.Join(", ", registry.Names));
        }
        catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested) { }
        catch (Exception e)
        {
            log.LogCritical(e, "Loading backbones failed; stopping");
            lifetime.StopApplication();
        }
    }
}

/// <summary>grpc.health.v1 reports SERVING once every backbone is resident.</summary>
public sealed class BackbonesHealthCheck(BackboneRegistry registry) : IHealthCheck
{
    public Task<HealthCheckResult> CheckHealthAsync(HealthCheckContext context, CancellationToken ct = default) =>
        Task.FromResult(registry.IsReady
            ? HealthCheckResult.Healthy("backbones loaded")
            : HealthCheckResult.Unhealthy(registry.LoadError is null ? "backbones loading" : "backbone loading failed", registry.LoadError));
}
