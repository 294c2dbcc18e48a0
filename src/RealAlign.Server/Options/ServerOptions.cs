using System.Net;

namespace RealAlign.Server.Options;

/// <summary>
/// Everything the server is configured with. The command line (<see cref="ServerCommandLine"/>) maps
/// onto this record; tests build it directly.
/// </summary>
public sealed record ServerOptions
{
    public const int DefaultGrpcPort = 50051;
    public const int DefaultMetricsPort = 9090;
    public const int DefaultMaxQueue = 64;
    public const int DefaultMaxImagesPerRequest = 16;
    public const int DefaultMaxSteps = 200;
    public const long DefaultMaxPixels = 2048L * 2048L;
    /// <summary>diffusers' StableDiffusion3Pipeline default step count.</summary>
    public const int DefaultSteps = 28;

    /// <summary>gRPC (HTTP/2 cleartext) port; 0 picks a free port (tests).</summary>
    public int GrpcPort { get; init; } = DefaultGrpcPort;
    /// <summary>Prometheus <c>/metrics</c> (HTTP/1.1) port; 0 picks a free port (tests).</summary>
    public int MetricsPort { get; init; } = DefaultMetricsPort;
    public IPAddress BindAddress { get; init; } = IPAddress.Loopback;

    /// <summary>Backbones from <c>--backbone NAME=DIR</c>; empty means "serve the embedded default".</summary>
    public IReadOnlyList<BackboneSpec> Backbones { get; init; } = [];
    /// <summary>Reward models from <c>--reward NAME=KIND:DIR</c> (wired by the Rewards service later).</summary>
    public IReadOnlyList<RewardSpec> Rewards { get; init; } = [];
    /// <summary>Root folder of the LoRA adapter registry (wired by the Adapters service later).</summary>
    public string? AdaptersRoot { get; init; }

    /// <summary>TorchSharp device string ("cpu", "cuda", "cuda:1"); null = cuda when available, else cpu.</summary>
    public string? Device { get; init; }
    /// <summary>Weights dtype ("float32", "float16", "bfloat16"); null = float32 on cpu, bfloat16 on cuda.</summary>
    public string? DType { get; init; }
    /// <summary>torch.set_num_threads; null leaves libtorch's default.</summary>
    public int? Threads { get; init; }

    /// <summary>Requests waiting for the device beyond this are refused with RESOURCE_EXHAUSTED.</summary>
    public int MaxQueue { get; init; } = DefaultMaxQueue;
    public int MaxImagesPerRequest { get; init; } = DefaultMaxImagesPerRequest;
    public int MaxSteps { get; init; } = DefaultMaxSteps;
    /// <summary>Upper bound on width × height of one image.</summary>
    public long MaxPixels { get; init; } = DefaultMaxPixels;

    /// <summary>gRPC message limit both ways; a 1024² float32 image tensor is 12 MB.</summary>
    public int MaxMessageBytes { get; init; } = 256 * 1024 * 1024;
}

/// <summary><c>--backbone NAME=DIR</c>: a diffusers SD3 pipeline folder served under NAME.</summary>
public sealed record BackboneSpec(string Name, string Directory);

/// <summary><c>--reward NAME=KIND:DIR</c>: a reward model of KIND (e.g. pickscore, hpsv2, aesthetic) loaded from DIR.</summary>
public sealed record RewardSpec(string Name, string Kind, string Directory);
