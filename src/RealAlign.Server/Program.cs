using RealAlign.Core.Pipelines;
using RealAlign.Server.Backbones;
using RealAlign.Server.Hosting;
using RealAlign.Server.Options;
using static TorchSharp.torch;

return await ServerCommandLine.Create(RunAsync).Parse(args).InvokeAsync();

static async Task<int> RunAsync(ServerOptions options, CancellationToken ct)
{
    var device = ServerHost.ResolveDevice(options.Device);
    var dtype = ServerHost.ResolveDType(options.DType, device);
    IReadOnlyList<BackboneRegistration> backbones = options.Backbones.Count == 0
        ? [new BackboneRegistration(Pipelines.EmbeddedDefaultName, "embedded", Pipelines.CreateEmbeddedDefault, Pipelines.EmbeddedDefaultSampleSize)]
        : options.Backbones.Select(b => new BackboneRegistration(b.Name, b.Directory, d => Pipelines.LoadFolder(b.Directory, d, dtype))).ToList();

    ServerHost server;
    try { server = await ServerHost.StartAsync(options, backbones, ct: ct); }
    catch (IOException e) // e.g. a port already in use
    {
        Console.Error.WriteLine($"error: {e.Message}");
        return 1;
    }
    await using (server)
    {
        await server.WaitForShutdownAsync(ct);
        return server.Registry.LoadError is null ? 0 : 1;
    }
}

/// <summary>The backbones the server can serve: the embedded default and diffusers SD3 folders.</summary>
static class Pipelines
{
    public const string EmbeddedDefaultName = TinySd3.Name;
    public static readonly int EmbeddedDefaultSampleSize = (int)TinySd3.TransformerConfig.SampleSize;

    public static ITextToImagePipeline CreateEmbeddedDefault(Device device) => TinySd3.Create(device);

    public static ITextToImagePipeline LoadFolder(string folder, Device device, ScalarType dtype) =>
        StableDiffusion3Pipeline.FromPretrained(folder, device, dtype);
}
