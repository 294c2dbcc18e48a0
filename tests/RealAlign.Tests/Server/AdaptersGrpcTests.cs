using System.Globalization;
using System.Text.RegularExpressions;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.Extensions.DependencyInjection;
using RealAlign.Core.Lora;
using RealAlign.Core.Pipelines;
using RealAlign.Server.Backbones;
using RealAlign.Server.Options;
using RealAlign.Server.Wire;
using RealAlign.Tests.Infrastructure;
using RealAlign.V1;
using static TorchSharp.torch;

namespace RealAlign.Tests.Server;

/// <summary>
/// A server with <c>--backbone fx=sd3_pipeline_lora/pipeline</c> and <c>--adapters-root
/// sd3_pipeline_lora/adapters</c> (adapter folders named by format), shared by the adapter tests.
/// </summary>
public sealed class LoraServerFixture : IAsyncLifetime
{
    public const string Backbone = "fx";
    public GoldenCase Case { get; } = Fixtures.Case("sd3_pipeline_lora");
    public TestServer Server { get; private set; } = null!;
    public V1.Adapters.AdaptersClient Adapters { get; private set; } = null!;
    public string AdaptersRoot => Case.PathOf("adapters");

    public async Task InitializeAsync()
    {
        var folder = Case.PathOf(Case.Json["pipeline_dir"]!.GetValue<string>());
        Server = await TestServer.StartAsync(
            [new BackboneRegistration(Backbone, folder, d => StableDiffusion3Pipeline.FromPretrained(folder, d))],
            TestServer.Options(maxQueue: 16) with { AdaptersRoot = AdaptersRoot });
        Adapters = new V1.Adapters.AdaptersClient(Server.Channel);
    }

    public async Task DisposeAsync()
    {
        await Server.DisposeAsync();
        Case.Dispose();
    }

    /// <summary>The case's call as a request, with its x_T as prior noise.</summary>
    public GenerateRequest CaseRequest(params (string Name, float Scale)[] adapters)
    {
        var a = Case.Json["call_args"]!.AsObject();
        using var latents = Case.In("latents");
        var req = new GenerateRequest
        {
            Backbone = Backbone,
            Prompt = a["prompt"]![0]!.GetValue<string>(),
            NegativePrompt = a["negative_prompt"]![0]!.GetValue<string>(),
            Width = a["width"]!.GetValue<uint>(), Height = a["height"]!.GetValue<uint>(),
            NumInferenceSteps = a["num_inference_steps"]!.GetValue<uint>(),
            GuidanceScale = a["guidance_scale"]!.GetValue<float>(),
            NumImages = 1, ReturnImageTensor = true, ReturnLatents = true, OmitPng = true,
        };
        req.PriorNoise.Add(TensorWire.FromTorch(latents[0]));
        foreach (var (n, s) in adapters) req.Adapters.Add(new AdapterRef { Name = n, Scale = s });
        return req;
    }

    public async Task<GeneratedImage> GenerateAsync(GenerateRequest req)
    {
        var events = await Server.CollectAsync(req);
        return Assert.Single(events.Where(e => e.EventCase == GenerateEvent.EventOneofCase.Image).Select(e => e.Image));
    }
}

public sealed class AdaptersGrpcTests(LoraServerFixture fx) : IClassFixture<LoraServerFixture>
{
    private static readonly Regex Scaled = new(@"^(?<fmt>\w+)\.scale_(?<s>[-0-9.eE+]+)\.final_latents$");

    private V1.Adapters.AdaptersClient Client => fx.Adapters;

    private static async Task<StatusCode> CodeOf(Func<Task> call)
    {
        var e = await Assert.ThrowsAsync<RpcException>(call);
        return e.StatusCode;
    }

    /// <summary>
    /// Acceptance: Load both formats via the API, then generate the stored images for no adapter and
    /// every stored (format, scale).
    /// </summary>
    [Fact]
    public async Task LoadsBothFormatsAndGeneratesTheStoredImages()
    {
        var c = fx.Case;
        var loaded = new Dictionary<string, AdapterInfo>();
        foreach (var dir in Directory.GetDirectories(fx.AdaptersRoot).Select(Path.GetFileName))
            loaded[dir!] = await Client.LoadAsync(new LoadAdapterRequest { Name = "case-" + dir, Backbone = LoraServerFixture.Backbone, Path = dir });
        Assert.Equal("diffusers", loaded["diffusers"].Format);
        Assert.Equal("peft", loaded["peft"].Format);
        var lora = c.Json["lora"]!.AsObject();
        Assert.Equal(lora["rank"]!.GetValue<uint>(), loaded["peft"].Rank);
        Assert.Equal(lora["lora_alpha"]!.GetValue<double>(), loaded["peft"].LoraAlpha);
        Assert.Equal(lora["adapted_modules"]!.AsArray().Count, loaded["peft"].Targets.Count);

        async Task Check(string prefix, params (string, float)[] adapters)
        {
            var img = await fx.GenerateAsync(fx.CaseRequest(adapters));
            using var image = TensorWire.ToTorch(img.Image, "image").unsqueeze(0);
            using var latents = TensorWire.ToTorch(img.Latents, "latents").unsqueeze(0);
            c.AssertClose(prefix + ".final_latents", latents);
            c.AssertClose(prefix + ".image", image);
            Assert.Equal(adapters.Select(a => $"{a.Item1}@1"), img.Adapters.Select(a => a.Name));
        }

        await Check("base");
        int n = 0;
        foreach (var name in c.OutNames)
        {
            var m = Scaled.Match(name);
            if (!m.Success) continue;
            var fmt = m.Groups["fmt"].Value;
            await Check(name[..^".final_latents".Length], ("case-" + fmt, float.Parse(m.Groups["s"].Value, CultureInfo.InvariantCulture)));
            n++;
        }
        Assert.True(n >= 3, $"only {n} stored adapter outputs");
    }

    /// <summary>
    /// Two clients generate concurrently (one with adapter "swap", one alternating "steady" and none)
    /// while a third hot-swaps "swap" to a new version mid-request: the running request finishes on
    /// the version it started with, the next one gets the new version, and every image equals a fresh
    /// single-request run with the same adapter version and seed.
    /// </summary>
    [Fact]
    public async Task HotSwapMidStreamKeepsRunningRequestsOnTheirVersion()
    {
        const string root = LoraServerFixture.Backbone;
        await Client.LoadAsync(new LoadAdapterRequest { Name = "swap", Backbone = root, Path = "diffusers" });
        await Client.LoadAsync(new LoadAdapterRequest { Name = "steady", Backbone = root, Path = "peft" });
        // Same files under other names: references for each version, computed alone.
        await Client.LoadAsync(new LoadAdapterRequest { Name = "ref-v1", Backbone = root, Path = "diffusers" });
        await Client.LoadAsync(new LoadAdapterRequest { Name = "ref-v2", Backbone = root, Path = "peft/adapter_model.safetensors" });

        GenerateRequest Req(long seed, params (string, float)[] adapters)
        {
            var r = fx.CaseRequest(adapters);
            r.PriorNoise.Clear();
            r.Seeds.Add(seed);
            return r;
        }
        async Task<ByteString> Alone(GenerateRequest r) => (await fx.GenerateAsync(r)).Image.Data;

        var refs = new Dictionary<string, ByteString>
        {
            ["swap@1"] = await Alone(Req(7, ("ref-v1", 0.75f))),
            ["swap@2"] = await Alone(Req(7, ("ref-v2", 0.75f))),
            ["steady"] = await Alone(Req(8, ("steady", 1f))),
            ["none"] = await Alone(Req(8)),
        };
        Assert.NotEqual(refs["swap@1"], refs["swap@2"]);

        // Client A: a request on v1 that is running when the swap lands, then one after it.
        using var first = fx.Server.Generation.Generate(Req(7, ("swap", 0.75f)));
        Assert.True(await first.ResponseStream.MoveNext());
        var clientB = Task.Run(async () =>
        {
            var got = new List<(string, ByteString)>();
            for (int i = 0; i < 4; i++)
            {
                var img = await fx.GenerateAsync(i % 2 == 0 ? Req(8, ("steady", 1f)) : Req(8));
                got.Add((i % 2 == 0 ? "steady" : "none", img.Image.Data));
            }
            return got;
        });
        // Client C: the hot swap, while A's first request is in flight.
        var swapped = await Client.LoadAsync(new LoadAdapterRequest { Name = "swap", Backbone = root, Path = "peft" });
        Assert.Equal(2ul, swapped.Version);

        GeneratedImage? firstImage = null;
        while (await first.ResponseStream.MoveNext())
            if (first.ResponseStream.Current.EventCase == GenerateEvent.EventOneofCase.Image) firstImage = first.ResponseStream.Current.Image;
        Assert.NotNull(firstImage);
        Assert.Equal("swap@1", firstImage!.Adapters.Single().Name);
        Assert.Equal(refs["swap@1"], firstImage.Image.Data);

        var second = await fx.GenerateAsync(Req(7, ("swap", 0.75f)));
        Assert.Equal("swap@2", second.Adapters.Single().Name);
        Assert.Equal(refs["swap@2"], second.Image.Data);

        foreach (var (kind, data) in await clientB) Assert.Equal(refs[kind], data);
        var listed = (await Client.ListAsync(new ListAdaptersRequest())).Adapters.Single(a => a.Name == "swap");
        Assert.Equal(2ul, listed.Version);
        Assert.Equal("peft", listed.Format);
    }

    [Fact]
    public async Task ExportRoundTripsAndUploadLoadsTheSameAdapter()
    {
        const string root = LoraServerFixture.Backbone;
        var original = await Client.LoadAsync(new LoadAdapterRequest { Name = "exp", Backbone = root, Path = "peft" });
        var registry = fx.Server.Host.App.Services.GetRequiredService<AdapterRegistry>();
        using var lease = registry.Acquire(["exp"]);
        var dir = Directory.CreateTempSubdirectory("realalign-export-test-");
        try
        {
            foreach (var format in new[] { "diffusers", "peft" })
            {
                var files = new Dictionary<string, MemoryStream>();
                using (var call = Client.Export(new ExportAdapterRequest { Name = "exp", Format = format }))
                    await foreach (var chunk in call.ResponseStream.ReadAllAsync())
                    {
                        if (!files.TryGetValue(chunk.Filename, out var ms)) files[chunk.Filename] = ms = new MemoryStream();
                        Assert.Equal((long)chunk.Offset, ms.Length);
                        chunk.Data.WriteTo(ms);
                    }
                var expected = format == "diffusers" ? new[] { LoraFormats.DiffusersWeightName } : [LoraFormats.PeftConfigName, LoraFormats.PeftWeightName];
                Assert.Equal(expected, files.Keys);
                var sub = Directory.CreateDirectory(Path.Combine(dir.FullName, format)).FullName;
                foreach (var (name, ms) in files) File.WriteAllBytes(Path.Combine(sub, name), ms.ToArray());

                // Lossless: the exported files load back to the same tensors and scalings.
                using var back = LoraFormats.Load(sub, registry.GetBackbone(root).Targets);
                Lora.LoraFormatsTests.AssertSame(lease["exp"].Weights, back);

                // Upload the exported files: same effect as Load.
                using var upload = Client.Upload();
                bool firstFile = true;
                foreach (var (name, ms) in files)
                {
                    await upload.RequestStream.WriteAsync(firstFile
                        ? new UploadAdapterChunk { Header = new UploadAdapterHeader { Name = "up-" + format, Backbone = root, Format = format, Filename = name } }
                        : new UploadAdapterChunk { NextFile = name });
                    firstFile = false;
                    var bytes = ms.ToArray();
                    for (int off = 0; off < bytes.Length; off += 4096)
                        await upload.RequestStream.WriteAsync(new UploadAdapterChunk { Data = ByteString.CopyFrom(bytes, off, Math.Min(4096, bytes.Length - off)) });
                }
                await upload.RequestStream.CompleteAsync();
                var info = await upload;
                Assert.Equal(format, info.Format);
                Assert.StartsWith("upload:", info.Source);
                Assert.Equal(original.Targets, info.Targets);
                Assert.Equal(original.LoraAlpha, info.LoraAlpha);
                using var upLease = registry.Acquire(["up-" + format]);
                Lora.LoraFormatsTests.AssertSame(lease["exp"].Weights, upLease["up-" + format].Weights);
            }
        }
        finally { dir.Delete(true); }
    }

    [Fact]
    public async Task ListGetUnloadAndBadInputGetClearStatuses()
    {
        const string root = LoraServerFixture.Backbone;
        var info = await Client.LoadAsync(new LoadAdapterRequest { Name = "tmp", Backbone = root, Path = "diffusers/pytorch_lora_weights.safetensors" });
        Assert.Equal(1ul, info.Version);
        Assert.Equal(64, info.Sha256.Length);
        Assert.Equal("diffusers/pytorch_lora_weights.safetensors", info.Source);
        Assert.Contains((await Client.ListAsync(new ListAdaptersRequest { Backbone = root })).Adapters, a => a.Name == "tmp");
        Assert.Empty((await Client.ListAsync(new ListAdaptersRequest { Backbone = "other" })).Adapters);
        Assert.Equal(info.Sha256, (await Client.GetAsync(new GetAdapterRequest { Name = "tmp" })).Sha256);
        Assert.Equal(1ul, (await Client.UnloadAsync(new UnloadAdapterRequest { Name = "tmp" })).Version);
        Assert.Equal(StatusCode.NotFound, await CodeOf(async () => await Client.GetAsync(new GetAdapterRequest { Name = "tmp" })));
        Assert.Equal(StatusCode.NotFound, await CodeOf(async () => await Client.UnloadAsync(new UnloadAdapterRequest { Name = "tmp" })));

        // Paths outside the root, unknown backbones, bad names.
        foreach (var bad in new[] { "../../sd3_lora/lora_diffusers", "/etc", "diffusers/../../.." })
            Assert.Equal(StatusCode.PermissionDenied, await CodeOf(async () => await Client.LoadAsync(new LoadAdapterRequest { Name = "x", Backbone = root, Path = bad })));
        Assert.Equal(StatusCode.NotFound, await CodeOf(async () => await Client.LoadAsync(new LoadAdapterRequest { Name = "x", Backbone = "nope", Path = "peft" })));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(async () => await Client.LoadAsync(new LoadAdapterRequest { Name = "a/b", Backbone = root, Path = "peft" })));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(async () => await Client.LoadAsync(new LoadAdapterRequest { Name = "x", Backbone = root, Path = "missing" })));

        // A corrupt upload is INVALID_ARGUMENT and leaves the registry as it was.
        var before = (await Client.ListAsync(new ListAdaptersRequest())).Adapters.Select(a => (a.Name, a.Version)).ToList();
        using (var upload = Client.Upload())
        {
            await upload.RequestStream.WriteAsync(new UploadAdapterChunk { Header = new UploadAdapterHeader { Name = "case-diffusers", Backbone = root, Filename = "w.safetensors" } });
            var bytes = File.ReadAllBytes(Path.Combine(fx.AdaptersRoot, "diffusers", LoraFormats.DiffusersWeightName));
            await upload.RequestStream.WriteAsync(new UploadAdapterChunk { Data = ByteString.CopyFrom(bytes, 0, bytes.Length - 100) });
            await upload.RequestStream.CompleteAsync();
            Assert.Equal(StatusCode.InvalidArgument, await CodeOf(async () => await upload));
        }
        using (var upload = Client.Upload())
        {
            await upload.RequestStream.WriteAsync(new UploadAdapterChunk { Header = new UploadAdapterHeader { Name = "x", Backbone = root, Filename = "../evil.safetensors" } });
            await upload.RequestStream.CompleteAsync();
            Assert.Equal(StatusCode.InvalidArgument, await CodeOf(async () => await upload));
        }
        Assert.Equal(before, (await Client.ListAsync(new ListAdaptersRequest())).Adapters.Select(a => (a.Name, a.Version)).ToList());

        // Generate: unknown adapter → NOT_FOUND, non-finite scale → INVALID_ARGUMENT.
        var e = await Assert.ThrowsAsync<RpcException>(() => fx.GenerateAsync(fx.CaseRequest(("no-such-adapter", 1f))));
        Assert.Equal(StatusCode.NotFound, e.StatusCode);
        Assert.Contains("no-such-adapter", e.Status.Detail);
        foreach (var s in new[] { float.NaN, float.PositiveInfinity })
        {
            e = await Assert.ThrowsAsync<RpcException>(() => fx.GenerateAsync(fx.CaseRequest(("whatever", s))));
            Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
            Assert.Contains("adapters[0].scale", e.Status.Detail);
        }
    }

    [Fact]
    public async Task LoadWithoutAnAdaptersRootIsRefused()
    {
        await using var server = await TestServer.StartAsync(new FakePipeline());
        var client = new V1.Adapters.AdaptersClient(server.Channel);
        Assert.Equal(StatusCode.FailedPrecondition, await CodeOf(async () => await client.LoadAsync(new LoadAdapterRequest { Name = "x", Path = "/tmp" })));
        Assert.Empty((await client.ListAsync(new ListAdaptersRequest())).Adapters);
    }
}
