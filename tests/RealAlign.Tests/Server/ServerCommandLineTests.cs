using System.Net;
using RealAlign.Server.Options;
using RealAlign.Tests.Infrastructure;

namespace RealAlign.Tests.Server;

public sealed class ServerCommandLineTests : IDisposable
{
    private readonly string _pipelineDir = Path.Combine(Fixtures.Root, "sd3_pipeline", "pipeline");
    private readonly string _plainDir = Directory.CreateTempSubdirectory("realalign-cli-").FullName;

    public void Dispose() => Directory.Delete(_plainDir, recursive: true);

    [Fact]
    public void No_arguments_give_the_documented_defaults()
    {
        var (options, errors) = ServerCommandLine.Parse();
        Assert.Empty(errors);
        Assert.NotNull(options);
        Assert.Equal((50051, 9090), (options.GrpcPort, options.MetricsPort));
        Assert.Equal(IPAddress.Loopback, options.BindAddress);
        Assert.Empty(options.Backbones);
        Assert.Equal((64, 200, 2048L * 2048), (options.MaxQueue, options.MaxSteps, options.MaxPixels));
        Assert.Null(options.Device);
        Assert.Null(options.DType);
    }

    [Fact]
    public void Every_option_maps_onto_server_options()
    {
        var (options, errors) = ServerCommandLine.Parse(
            "--grpc-port", "6000", "--metrics-port", "6001", "--bind", "0.0.0.0",
            "--backbone", $"tiny={_pipelineDir}", "--backbone", $"tiny2={_pipelineDir}",
            "--reward", $"pick=pickscore:{_plainDir}", "--adapters-root", _plainDir,
            "--device", "cuda:1", "--dtype", "bfloat16", "--max-queue", "3", "--max-images-per-request", "2",
            "--max-steps", "50", "--max-pixels", "65536", "--threads", "4");
        Assert.Empty(errors);
        Assert.Equal((6000, 6001), (options!.GrpcPort, options.MetricsPort));
        Assert.Equal(IPAddress.Any, options.BindAddress);
        Assert.Equal([new BackboneSpec("tiny", Path.GetFullPath(_pipelineDir)), new BackboneSpec("tiny2", Path.GetFullPath(_pipelineDir))], options.Backbones);
        Assert.Equal([new RewardSpec("pick", "pickscore", Path.GetFullPath(_plainDir))], options.Rewards);
        Assert.Equal(_plainDir, options.AdaptersRoot);
        Assert.Equal(("cuda:1", "bfloat16"), (options.Device, options.DType));
        Assert.Equal((3, 2, 50, 65536L, 4), (options.MaxQueue, options.MaxImagesPerRequest, options.MaxSteps, options.MaxPixels, options.Threads));
    }

    public static TheoryData<string[], string> Malformed() => new()
    {
        { ["--backbone", "sd35m"], "--backbone: 'sd35m' is not NAME=DIR" },
        { ["--backbone", "=/models/x"], "is not NAME=DIR" },
        { ["--backbone", "sd35m="], "is not NAME=DIR" },
        { ["--backbone", "bad name=/tmp"], "name 'bad name' may only contain" },
        { ["--backbone", "x=/no/such/folder"], "folder '/no/such/folder' does not exist" },
        { ["--reward", "pick"], "--reward: 'pick' is not NAME=KIND:DIR" },
        { ["--reward", "pick=pickscore"], "is not NAME=KIND:DIR" },
        { ["--reward", "pick=:/tmp"], "is not NAME=KIND:DIR" },
        { ["--reward", "pick=PickScore:/tmp"], "kind 'PickScore' must be a lowercase identifier" },
        { ["--reward", "pick=pickscore:/no/such/folder"], "folder '/no/such/folder' does not exist" },
        { ["--device", "tpu"], "--device: 'tpu' is not one of cpu, cuda, cuda:N" },
        { ["--dtype", "fp8"], "--dtype: 'fp8' is not one of float32, float16, bfloat16" },
        { ["--grpc-port", "70000"], "--grpc-port: 70000 is not a TCP port" },
        { ["--max-queue", "0"], "--max-queue: must be positive" },
        { ["--bind", "not-an-address"], "--bind: 'not-an-address' is not an IP address" },
    };

    [Theory]
    [MemberData(nameof(Malformed))]
    public void Malformed_values_are_rejected_with_a_clear_error(string[] args, string message)
    {
        var (options, errors) = ServerCommandLine.Parse(args);
        Assert.Null(options);
        Assert.Contains(errors, e => e.Contains(message));
    }

    [Fact]
    public void A_backbone_folder_needs_model_index_json_and_names_are_unique()
    {
        var (_, errors) = ServerCommandLine.Parse("--backbone", $"x={_plainDir}");
        Assert.Contains(errors, e => e.Contains("is not a diffusers pipeline folder (no model_index.json)"));

        (_, errors) = ServerCommandLine.Parse("--backbone", $"x={_pipelineDir}", "--backbone", $"x={_pipelineDir}");
        Assert.Contains(errors, e => e.Contains("name 'x' is given twice"));

        (_, errors) = ServerCommandLine.Parse("--reward", $"r=aesthetic:{_plainDir}", "--reward", $"r=hpsv2:{_plainDir}");
        Assert.Contains(errors, e => e.Contains("--reward: name 'r' is given twice"));
    }

    [Fact]
    public async Task The_root_command_exits_non_zero_on_a_malformed_backbone_without_running()
    {
        var ran = false;
        var root = ServerCommandLine.Create((_, _) => { ran = true; return Task.FromResult(0); });
        var output = new StringWriter();
        var code = await root.Parse(["--backbone", "oops"]).InvokeAsync(new System.CommandLine.InvocationConfiguration { Output = output, Error = output });
        Assert.NotEqual(0, code);
        Assert.False(ran);
        Assert.Contains("'oops' is not NAME=DIR", output.ToString());
    }
}
