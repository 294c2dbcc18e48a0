using System.Diagnostics;
using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.Extensions.Logging;
using RealAlign.Core.Pipelines;
using RealAlign.Server.Backbones;
using RealAlign.Server.Hosting;
using RealAlign.Server.Options;
using RealAlign.V1;
using static TorchSharp.torch;

namespace RealAlign.Bench;

/// <summary>
/// Ratio of gRPC Generate wall time (loopback client, PNG encoding, progress stream, executor hop)
/// to the in-process pipeline call for the embedded tiny default — the serving overhead. Interleaved
/// so both sides see the same machine state.
/// </summary>
public static class GrpcOverheadBench
{
    public static async Task RunAsync(int reps = 15)
    {
        var options = new ServerOptions { GrpcPort = 0, MetricsPort = 0, Device = "cpu", MaxQueue = 8, MaxSteps = 200, MaxImagesPerRequest = 16, MaxPixels = 1024 * 1024 };
        using var direct = TinySd3.Create();
        await using var host = await ServerHost.StartAsync(options,
            [new BackboneRegistration(TinySd3.Name, "embedded", d => TinySd3.Create(d), (int)TinySd3.TransformerConfig.SampleSize)],
            l => l.SetMinimumLevel(LogLevel.Warning));
        while (!host.Registry.IsReady) await Task.Delay(20);
        using var channel = GrpcChannel.ForAddress(host.GrpcAddress, new GrpcChannelOptions { MaxReceiveMessageSize = 256 << 20 });
        var client = new Generation.GenerationClient(channel);
        int side = direct.DefaultSize;
        const int steps = 28;

        foreach (int n in new[] { 1, 4 })
        {
            var opts = new GenerationOptions { Prompt = "a red cube", NegativePrompt = "blurry", Width = side, Height = side, NumInferenceSteps = steps, GuidanceScale = 5, NumImages = n, Seeds = Enumerable.Range(0, n).Select(i => (long)i).ToArray() };
            var req = new GenerateRequest { Backbone = TinySd3.Name, Prompt = opts.Prompt, NegativePrompt = opts.NegativePrompt, Width = (uint)side, Height = (uint)side, NumInferenceSteps = steps, GuidanceScale = 5, NumImages = (uint)n };
            req.Seeds.Add(opts.Seeds);
            var tDirect = new List<double>(); var tGrpc = new List<double>();
            for (int r = -2; r < reps; r++) // two warm-up rounds
            {
                var sw = Stopwatch.StartNew();
                using (no_grad()) using (NewDisposeScope()) foreach (var s in direct.Generate(opts, null, CancellationToken.None)) s.Dispose();
                double d = sw.Elapsed.TotalSeconds;
                sw.Restart();
                using (var call = client.Generate(req)) await foreach (var _ in call.ResponseStream.ReadAllAsync()) { }
                double g = sw.Elapsed.TotalSeconds;
                if (r >= 0) { tDirect.Add(d); tGrpc.Add(g); }
            }
            tDirect.Sort(); tGrpc.Sort();
            double md = tDirect[reps / 2], mg = tGrpc[reps / 2];
            Console.WriteLine($"tiny-sd3 {side}x{side}, {steps} steps, {n} image(s)/request: in-process {md * 1000:F1} ms, gRPC {mg * 1000:F1} ms, ratio gRPC/in-process {mg / md:F3}, {n / mg:F2} images/s via gRPC (median of {reps})");
        }
    }
}
