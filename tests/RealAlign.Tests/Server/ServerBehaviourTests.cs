using System.Diagnostics;
using Grpc.Core;
using Grpc.Health.V1;
using Grpc.Reflection.V1Alpha;
using Microsoft.Extensions.DependencyInjection;
using RealAlign.Server.Backbones;
using RealAlign.Server.Execution;
using RealAlign.V1;

namespace RealAlign.Tests.Server;

/// <summary>Queueing, cancellation, deadlines, health, reflection and metrics, each on a server of its own.</summary>
public sealed class ServerBehaviourTests
{
    private static async Task<GenerateEvent> NextAsync(IAsyncStreamReader<GenerateEvent> stream, Func<GenerateEvent, bool> until)
    {
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        while (await stream.MoveNext(timeout.Token))
            if (until(stream.Current)) return stream.Current;
        throw new InvalidOperationException("stream ended before the expected event");
    }

    private static bool IsStep(GenerateEvent e) => e.EventCase == GenerateEvent.EventOneofCase.Progress && e.Progress.Step > 0;

    [Fact]
    public async Task A_full_queue_answers_resource_exhausted_and_recovers()
    {
        var fake = new FakePipeline { StepDelay = TimeSpan.FromMilliseconds(50) };
        await using var server = await TestServer.StartAsync(fake, TestServer.Options(maxQueue: 1));
        using var cancelRunning = new CancellationTokenSource();
        using var cancelQueued = new CancellationTokenSource();

        using var running = server.Generation.Generate(TestServer.Valid(steps: 200), cancellationToken: cancelRunning.Token);
        await NextAsync(running.ResponseStream, IsStep); // on the device now

        using var queued = server.Generation.Generate(TestServer.Valid(steps: 2), cancellationToken: cancelQueued.Token);
        var position = await NextAsync(queued.ResponseStream, e => e.EventCase == GenerateEvent.EventOneofCase.Progress);
        Assert.Equal(1u, position.Progress.QueuePosition); // the one queue slot is taken

        var refused = await Assert.ThrowsAsync<RpcException>(() => server.CollectAsync(TestServer.Valid()));
        Assert.Equal(StatusCode.ResourceExhausted, refused.StatusCode);
        Assert.Contains("queue is full", refused.Status.Detail);

        cancelQueued.Cancel();
        cancelRunning.Cancel();
        // The cancellations reach the server asynchronously (RST_STREAM); wait until both are gone.
        var executor = server.Host.App.Services.GetRequiredService<DeviceExecutor>();
        var until = DateTime.UtcNow.AddSeconds(10);
        while ((executor.QueueDepth > 0 || executor.IsBusy) && DateTime.UtcNow < until) await Task.Delay(10);
        Assert.Equal(0, executor.QueueDepth);
        var events = await server.CollectAsync(TestServer.Valid(steps: 2));
        Assert.Single(events, e => e.EventCase == GenerateEvent.EventOneofCase.Image);
        var metrics = await server.GetMetricsTextAsync();
        Assert.Contains("status=\"ResourceExhausted\"", metrics);
    }

    [Fact]
    public async Task Cancelling_mid_stream_frees_the_device_for_the_next_request()
    {
        var fake = new FakePipeline { StepDelay = TimeSpan.FromMilliseconds(50) };
        await using var server = await TestServer.StartAsync(fake);
        using var cts = new CancellationTokenSource();

        using (var call = server.Generation.Generate(TestServer.Valid(steps: 200), cancellationToken: cts.Token))
        {
            await NextAsync(call.ResponseStream, IsStep);
            await NextAsync(call.ResponseStream, IsStep);
            cts.Cancel();
            var e = await Assert.ThrowsAnyAsync<Exception>(() => NextAsync(call.ResponseStream, _ => false));
            Assert.True(e is OperationCanceledException or RpcException { StatusCode: StatusCode.Cancelled }, e.ToString());
        }

        // 200 steps × 50 ms would hold the device for 10 s; the next request must start long before that.
        var clock = Stopwatch.StartNew();
        using var next = server.Generation.Generate(TestServer.Valid(steps: 2));
        await NextAsync(next.ResponseStream, IsStep);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), $"next request waited {clock.Elapsed}");
        await NextAsync(next.ResponseStream, e => e.EventCase == GenerateEvent.EventOneofCase.Image);
        Assert.Equal(1, fake.Cancelled);
    }

    [Fact]
    public async Task A_deadline_stops_the_sampler_between_steps()
    {
        var fake = new FakePipeline { StepDelay = TimeSpan.FromMilliseconds(50) };
        await using var server = await TestServer.StartAsync(fake);

        var e = await Assert.ThrowsAsync<RpcException>(() =>
            server.CollectAsync(TestServer.Valid(steps: 200), deadline: DateTime.UtcNow.AddMilliseconds(500)));
        Assert.Equal(StatusCode.DeadlineExceeded, e.StatusCode);

        var clock = Stopwatch.StartNew();
        var events = await server.CollectAsync(TestServer.Valid(steps: 2));
        Assert.Single(events, ev => ev.EventCase == GenerateEvent.EventOneofCase.Image);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), $"next request took {clock.Elapsed}");
        var until = DateTime.UtcNow.AddSeconds(5);
        while (fake.Cancelled == 0 && DateTime.UtcNow < until) await Task.Delay(20);
        Assert.Equal(1, fake.Cancelled);
    }

    [Fact]
    public async Task Every_generation_runs_on_the_one_device_thread()
    {
        var fake = new FakePipeline();
        await using var server = await TestServer.StartAsync(fake);
        var threads = new HashSet<int>();
        for (var i = 0; i < 3; i++)
        {
            await Task.WhenAll(server.CollectAsync(TestServer.Valid()), server.CollectAsync(TestServer.Valid()));
            threads.Add(fake.LastThreadId!.Value);
        }
        Assert.Single(threads);
        Assert.NotEqual(Environment.CurrentManagedThreadId, threads.Single());
    }

    [Fact]
    public async Task Health_is_not_serving_until_backbones_are_loaded()
    {
        using var gate = new ManualResetEventSlim();
        var fake = new FakePipeline();
        await using var server = await TestServer.StartAsync(
            [new BackboneRegistration("fake", "test", _ => { gate.Wait(TimeSpan.FromSeconds(30)); return fake; }, DefaultSampleSize: 8)],
            waitUntilServing: false);

        var before = await server.Health.CheckAsync(new HealthCheckRequest());
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, before.Status);
        // A request made while loading waits for the load (within its deadline) instead of failing.
        var early = await Assert.ThrowsAsync<RpcException>(() => server.CollectAsync(TestServer.Valid(), deadline: DateTime.UtcNow.AddMilliseconds(300)));
        Assert.Equal(StatusCode.DeadlineExceeded, early.StatusCode);
        var waiting = server.CollectAsync(TestServer.Valid());
        await Task.Delay(200);
        Assert.False(waiting.IsCompleted);

        gate.Set();
        Assert.Single(await waiting, e => e.EventCase == GenerateEvent.EventOneofCase.Image);
        var until = DateTime.UtcNow.AddSeconds(30);
        HealthCheckResponse after;
        do
        {
            await Task.Delay(20);
            after = await server.Health.CheckAsync(new HealthCheckRequest());
        } while (after.Status != HealthCheckResponse.Types.ServingStatus.Serving && DateTime.UtcNow < until);
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, after.Status);
        var named = await server.Health.CheckAsync(new HealthCheckRequest { Service = "realalign.v1.Generation" });
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, named.Status);
        Assert.Single(await server.CollectAsync(TestServer.Valid()), e => e.EventCase == GenerateEvent.EventOneofCase.Image);
    }

    [Fact]
    public async Task Reflection_lists_the_services()
    {
        await using var server = await TestServer.StartAsync(new FakePipeline());
        var client = new ServerReflection.ServerReflectionClient(server.Channel);
        using var call = client.ServerReflectionInfo();
        await call.RequestStream.WriteAsync(new ServerReflectionRequest { ListServices = "" });
        await call.RequestStream.CompleteAsync();
        Assert.True(await call.ResponseStream.MoveNext(CancellationToken.None));
        var names = call.ResponseStream.Current.ListServicesResponse.Service.Select(s => s.Name).ToList();
        Assert.Contains("realalign.v1.Generation", names);
        Assert.Contains("grpc.health.v1.Health", names);
    }

    [Fact]
    public async Task Metrics_serves_prometheus_text_on_the_metrics_port()
    {
        await using var server = await TestServer.StartAsync(new FakePipeline());
        await server.CollectAsync(TestServer.Valid(images: 2, steps: 3));

        var text = await server.GetMetricsTextAsync();

        Assert.Contains("# TYPE realalign_requests_total counter", text);
        Assert.Contains("realalign_requests_total{rpc=\"realalign.v1.Generation/Generate\",status=\"OK\"} 1", text);
        Assert.Contains("realalign_images_generated_total{backbone=\"fake\"} 2", text);
        Assert.Contains("realalign_step_duration_seconds_count{backbone=\"fake\"} 3", text);
        Assert.Contains("realalign_queue_depth{device=\"cpu\"}", text);
    }
}
