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

// ======================================================================================
// LEAD: the only placeholder in the server. Swap these two bodies for
//   StableDiffusion3Pipeline.CreateTiny(device)  and
//   StableDiffusion3Pipeline.FromPretrained(folder, device, dtype)
// (and EmbeddedDefaultSampleSize for the tiny config's transformer sample_size).
// ======================================================================================
static class Pipelines
{
    public const string EmbeddedDefaultName = "tiny-sd3";
    public const int EmbeddedDefaultSampleSize = 16;

    public static ITextToImagePipeline CreateEmbeddedDefault(Device device) =>
        throw new NotImplementedException("StableDiffusion3Pipeline.CreateTiny is not merged yet");

    public static ITextToImagePipeline LoadFolder(string folder, Device device, ScalarType dtype) =>
        throw new NotImplementedException($"StableDiffusion3Pipeline.FromPretrained is not merged yet ({folder})");
}
