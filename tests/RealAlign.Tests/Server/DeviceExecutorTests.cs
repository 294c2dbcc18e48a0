using RealAlign.Server.Execution;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Tests.Server;

public sealed class DeviceExecutorTests
{
    [Fact]
    public async Task Work_runs_on_one_dedicated_thread_inside_a_dispose_scope_without_grad()
    {
        using var executor = new DeviceExecutor(CPU, capacity: 4);
        var results = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => executor.RunAsync(_ =>
        {
            var t = torch.ones(3, requires_grad: true) * 2;
            return (Environment.CurrentManagedThreadId, t.requires_grad, DisposeScopeActive: torch.CurrentDisposeScope is not null);
        }, CancellationToken.None)));
        Assert.Single(results.Select(r => r.CurrentManagedThreadId).Distinct());
        Assert.NotEqual(Environment.CurrentManagedThreadId, results[0].CurrentManagedThreadId);
        Assert.All(results, r => Assert.False(r.requires_grad));
        Assert.All(results, r => Assert.True(r.DisposeScopeActive));
    }

    [Fact]
    public async Task A_full_queue_throws_and_a_cancelled_waiting_item_never_runs_and_frees_its_slot()
    {
        using var executor = new DeviceExecutor(CPU, capacity: 1);
        using var release = new ManualResetEventSlim();
        var blocker = executor.RunAsync(_ => release.Wait(TimeSpan.FromSeconds(30)), CancellationToken.None);
        while (!executor.IsBusy) await Task.Delay(5);

        using var cts = new CancellationTokenSource();
        var ran = false;
        int? position = null;
        var waiting = executor.RunAsync(_ => ran = true, cts.Token, onQueued: p => position = p);
        Assert.Equal(1, position);
        Assert.IsType<CapacityExceededException>(Record.Exception(() => { _ = executor.RunAsync(_ => 0, CancellationToken.None); }));

        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => waiting);
        Assert.Equal(0, executor.QueueDepth);
        var next = executor.RunAsync(_ => 42, CancellationToken.None); // the slot is free again

        release.Set();
        Assert.True(await blocker);
        Assert.Equal(42, await next);
        Assert.False(ran);
    }

    [Fact]
    public async Task A_running_item_sees_its_token_and_failures_reach_the_caller()
    {
        using var executor = new DeviceExecutor(CPU, capacity: 2);
        using var cts = new CancellationTokenSource();
        var started = new TaskCompletionSource();
        var running = executor.RunAsync(ct =>
        {
            started.SetResult();
            while (true) { ct.ThrowIfCancellationRequested(); Thread.Sleep(5); }
#pragma warning disable CS0162
            return 0;
#pragma warning restore CS0162
        }, cts.Token);
        await started.Task;
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => running);

        var failing = executor.RunAsync<int>(_ => throw new InvalidOperationException("boom"), CancellationToken.None);
        Assert.Equal("boom", (await Assert.ThrowsAsync<InvalidOperationException>(() => failing)).Message);
    }
}
