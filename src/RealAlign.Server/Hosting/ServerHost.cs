using System.Net;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Prometheus;
using RealAlign.Core.Lora;
using RealAlign.Server.Backbones;
using RealAlign.Server.Execution;
using RealAlign.Server.Interceptors;
using RealAlign.Server.Observability;
using RealAlign.Server.Options;
using RealAlign.Server.Services;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Server.Hosting;

/// <summary>
/// Builds and runs the server: Kestrel with gRPC on one port (HTTP/2 cleartext only) and Prometheus
/// on another (HTTP/1.1), DI singletons for the device executor, backbone registry and metrics.
/// Program.cs and the tests both go through <see cref="StartAsync"/>.
/// </summary>
public sealed class ServerHost : IAsyncDisposable
{
    private readonly ListenOptions _grpcListen;
    private readonly ListenOptions _metricsListen;

    public WebApplication App { get; }
    public ServerOptions Options { get; }
    public BackboneRegistry Registry => App.Services.GetRequiredService<BackboneRegistry>();

    /// <summary>Bound ports (differ from the options when those asked for port 0).</summary>
    public int GrpcPort => ((IPEndPoint)_grpcListen.EndPoint).Port;
    public int MetricsPort => ((IPEndPoint)_metricsListen.EndPoint).Port;
    public Uri GrpcAddress => new($"http://{Host(Options.BindAddress)}:{GrpcPort}");
    public Uri MetricsAddress => new($"http://{Host(Options.BindAddress)}:{MetricsPort}");

    private ServerHost(WebApplication app, ServerOptions options, ListenOptions grpc, ListenOptions metrics)
    {
        App = app; Options = options; _grpcListen = grpc; _metricsListen = metrics;
    }

    /// <summary>Starts listening; backbones load in the background (health turns SERVING when done).</summary>
    public static async Task<ServerHost> StartAsync(
        ServerOptions options,
        IReadOnlyList<BackboneRegistration> backbones,
        Action<ILoggingBuilder>? configureLogging = null,
        CancellationToken ct = default)
    {
        var device = ResolveDevice(options.Device);
        if (options.Threads is { } threads) torch.set_num_threads(threads);

        var builder = WebApplication.CreateBuilder(new WebApplicationOptions
        {
            // System.CommandLine owns argv; ASP.NET must not read it as configuration.
            Args = [],
            ContentRootPath = AppContext.BaseDirectory,
        });

        builder.Logging.ClearProviders();
        builder.Logging.AddSimpleConsole(o =>
        {
            o.SingleLine = true;
            o.TimestampFormat = "yyyy-MM-ddTHH:mm:ss.fffZ ";
            o.UseUtcTimestamp = true;
        });
        builder.Logging.AddFilter("Microsoft.AspNetCore", LogLevel.Warning);
        builder.Logging.AddFilter("Grpc", LogLevel.Warning);
        configureLogging?.Invoke(builder.Logging);

        ListenOptions? grpcListen = null, metricsListen = null;
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.Listen(options.BindAddress, options.GrpcPort, l => { l.Protocols = HttpProtocols.Http2; grpcListen = l; });
            k.Listen(options.BindAddress, options.MetricsPort, l => { l.Protocols = HttpProtocols.Http1; metricsListen = l; });
        });

        var metrics = new ServerMetrics();
        builder.Services.AddSingleton(options);
        builder.Services.AddSingleton(metrics);
        builder.Services.AddSingleton(_ =>
        {
            var executor = new DeviceExecutor(device, options.MaxQueue);
            var depth = metrics.QueueDepth.WithLabels(device.ToString());
            executor.QueueDepthChanged += n => depth.Set(n);
            return executor;
        });
        builder.Services.AddSingleton(sp => new BackboneRegistry(
            backbones, sp.GetRequiredService<DeviceExecutor>(), sp.GetRequiredService<ILogger<BackboneRegistry>>()));
        builder.Services.AddHostedService<BackboneLoader>();
        var rewards = RewardsService.LoadRegistry(options, device);
        builder.Services.AddSingleton(_ => rewards); // factory-registered: the container disposes it
        builder.Services.AddSingleton(_ => new AdapterRegistry(new AdapterRegistryOptions { AdaptersRoot = options.AdaptersRoot }));
        builder.Services.AddSingleton<AdapterBackboneBinder>();

        builder.Services.AddGrpc(o =>
        {
            o.MaxReceiveMessageSize = options.MaxMessageBytes;
            o.MaxSendMessageSize = options.MaxMessageBytes;
            o.EnableDetailedErrors = false; // ExceptionInterceptor already puts client-facing detail in the status
            o.Interceptors.Add<ExceptionInterceptor>();
        });
        builder.Services.AddGrpcReflection();
        builder.Services.AddGrpcHealthChecks(o =>
            {
                o.Services.Map("", _ => true);
                o.Services.Map(V1.Generation.Descriptor.FullName, _ => true);
                o.Services.Map(V1.Adapters.Descriptor.FullName, _ => true);
            })
            .AddCheck<BackbonesHealthCheck>("backbones");

        var app = builder.Build();
        app.MapGrpcService<GenerationService>();
        app.MapGrpcService<RewardsService>();
        app.MapGrpcService<AdaptersService>();
        app.MapGrpcHealthChecksService();
        app.MapGrpcReflectionService();
        // /metrics answers only on the metrics port (RequireHost cannot name a port chosen at bind time).
        app.MapMetrics("/metrics", metrics.Registry).Add(endpoint =>
        {
            var inner = endpoint.RequestDelegate!;
            endpoint.RequestDelegate = ctx =>
            {
                if (metricsListen is not null && ctx.Connection.LocalPort == ((IPEndPoint)metricsListen.EndPoint).Port) return inner(ctx);
                ctx.Response.StatusCode = StatusCodes.Status404NotFound;
                return Task.CompletedTask;
            };
        });

        await app.StartAsync(ct);
        var log = app.Services.GetRequiredService<ILogger<ServerHost>>();
        var host = new ServerHost(app, options, grpcListen!, metricsListen!);
        log.LogInformation("gRPC on {Grpc} (h2c), metrics on {Metrics}, device {Device}, backbones: {Backbones}",
            host.GrpcAddress.ToString().TrimEnd('/'), new Uri(host.MetricsAddress, "metrics"), device, string.Join(", ", backbones.Select(b => $"{b.Name}={b.Source}")));
        return host;
    }

    /// <summary>Waits for shutdown (Ctrl+C / SIGTERM / StopApplication).</summary>
    public Task WaitForShutdownAsync(CancellationToken ct = default) => App.WaitForShutdownAsync(ct);

    public async ValueTask DisposeAsync()
    {
        try { await App.StopAsync(TimeSpan.FromSeconds(5)); }
        catch (OperationCanceledException) { }
        await App.DisposeAsync();
    }

    /// <summary>"cpu", "cuda", "cuda:N"; null picks cuda when libtorch sees a GPU, else cpu.</summary>
    public static Device ResolveDevice(string? name) =>
        name is null ? (torch.cuda.is_available() ? torch.CUDA : torch.CPU) : torch.device(name);

    /// <summary>--dtype, defaulting to float32 on cpu and bfloat16 on cuda.</summary>
    public static ScalarType ResolveDType(string? name, Device device) => name switch
    {
        null => device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32,
        "float32" => ScalarType.Float32,
        "float16" => ScalarType.Float16,
        "bfloat16" => ScalarType.BFloat16,
        _ => throw new ArgumentException($"unknown dtype '{name}'"),
    };

    private static string Host(IPAddress a) =>
        a.Equals(IPAddress.Any) ? "127.0.0.1"
        : a.Equals(IPAddress.IPv6Any) ? "[::1]"
        : a.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 ? $"[{a}]"
        : a.ToString();
}
