using Prometheus;

namespace RealAlign.Server.Observability;

/// <summary>
/// The server's Prometheus collectors, in a registry of their own so that several servers in one
/// process (tests) do not share counters. Served on the metrics port at <c>/metrics</c>.
/// </summary>
public sealed class ServerMetrics
{
    public CollectorRegistry Registry { get; }
    /// <summary>realalign_requests_total{rpc, status}.</summary>
    public Counter Requests { get; }
    /// <summary>realalign_request_duration_seconds{rpc}.</summary>
    public Histogram RequestDuration { get; }
    /// <summary>realalign_queue_depth{device}: requests waiting for the device.</summary>
    public Gauge QueueDepth { get; }
    /// <summary>realalign_images_generated_total{backbone}.</summary>
    public Counter ImagesGenerated { get; }
    /// <summary>realalign_step_duration_seconds{backbone}: wall time of one denoising step (whole batch, CFG included).</summary>
    public Histogram StepDuration { get; }

    public ServerMetrics()
    {
        Registry = Metrics.NewCustomRegistry();
        DotNetStats.Register(Registry);
        var f = Metrics.WithCustomRegistry(Registry);
        Requests = f.CreateCounter("realalign_requests_total", "gRPC calls by method and final status code", ["rpc", "status"]);
        RequestDuration = f.CreateHistogram("realalign_request_duration_seconds", "gRPC call duration", ["rpc"],
            new HistogramConfiguration { Buckets = Histogram.ExponentialBuckets(0.005, 2, 16) });
        QueueDepth = f.CreateGauge("realalign_queue_depth", "Requests waiting for the device", ["device"]);
        ImagesGenerated = f.CreateCounter("realalign_images_generated_total", "Images generated", ["backbone"]);
        StepDuration = f.CreateHistogram("realalign_step_duration_seconds", "Wall time of one denoising step", ["backbone"],
            new HistogramConfiguration { Buckets = Histogram.ExponentialBuckets(0.001, 2, 16) });
    }
}
