using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Server.Execution;

/// <summary>
/// The one thread that owns all torch work for one device. Work items wait in a bounded FIFO and run
/// one at a time, each inside <c>torch.NewDisposeScope()</c> and <c>torch.no_grad()</c>. Both of those
/// are thread-local in TorchSharp, which is why a work item is a synchronous <see cref="Func{T,TResult}"/>
/// that must never await: everything it allocates is freed when it returns, so it must copy what it
/// hands back into managed memory (or move tensors out of the scope explicitly).
/// </summary>
/// <remarks>
/// A waiting item whose token fires leaves the queue at once (its slot is free again) and never
/// touches the device; a running item sees the token between denoising steps (the pipeline checks it).
/// Batching seam: <see cref="Loop"/> takes exactly one item today. Merging compatible requests (same
/// backbone, size and step count) belongs there: take the head item, also take the queued items with
/// the same batch key, run them as one call and complete each caller's task with its share.
/// </remarks>
public sealed class DeviceExecutor : IDisposable
{
    private readonly object _gate = new();
    private readonly LinkedList<IWorkItem> _pending = new();
    private readonly Thread _thread;
    private IWorkItem? _current;
    private bool _stopping;

    public Device Device { get; }
    /// <summary>Items allowed to wait (not counting the one running).</summary>
    public int Capacity { get; }

    /// <summary>Items waiting (not counting the one running).</summary>
    public int QueueDepth { get { lock (_gate) return _pending.Count; } }
    /// <summary>True while an item is running on the device thread.</summary>
    public bool IsBusy { get { lock (_gate) return _current is not null; } }

    /// <summary>Raised after every change of <see cref="QueueDepth"/> with the new depth (for metrics).</summary>
    public event Action<int>? QueueDepthChanged;

    public DeviceExecutor(Device device, int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        Device = device;
        Capacity = capacity;
        _thread = new Thread(Loop) { IsBackground = true, Name = $"torch-{device}" };
        _thread.Start();
    }

    /// <summary>
    /// Queues <paramref name="work"/> for the device thread. Throws <see cref="CapacityExceededException"/>
    /// at once when <see cref="Capacity"/> items are already waiting. <paramref name="onQueued"/> gets the
    /// number of items ahead of this one (the running one included) right after it was queued.
    /// </summary>
    /// <param name="scoped">false only for work whose tensors must outlive the call (loading weights).</param>
    public Task<T> RunAsync<T>(Func<CancellationToken, T> work, CancellationToken ct, Action<int>? onQueued = null, bool scoped = true)
    {
        if (ct.IsCancellationRequested) return Task.FromCanceled<T>(ct);
        var item = new WorkItem<T>(work, ct, scoped);
        item.OnCancelled(() => Withdraw(item)); // before queueing, so the device thread never races the registration
        int ahead, depth;
        lock (_gate)
        {
            if (_stopping || _pending.Count >= Capacity)
            {
                item.DisposeRegistration();
                ObjectDisposedException.ThrowIf(_stopping, this);
                throw new CapacityExceededException($"the {Device} queue is full ({Capacity} requests waiting); retry later");
            }
            ahead = _pending.Count + (_current is null ? 0 : 1);
            item.Node = _pending.AddLast(item);
            depth = _pending.Count;
            Monitor.Pulse(_gate);
        }
        QueueDepthChanged?.Invoke(depth);
        onQueued?.Invoke(ahead);
        if (ct.IsCancellationRequested) Withdraw(item); // fired between registering and queueing
        return item.Task;
    }

    private void Withdraw(IWorkItem item)
    {
        int depth;
        lock (_gate)
        {
            if (item.Node?.List is null) return; // already taken by the device thread
            _pending.Remove(item.Node);
            depth = _pending.Count;
        }
        item.Drop();
        QueueDepthChanged?.Invoke(depth);
    }

    private void Loop()
    {
        while (true)
        {
            IWorkItem item;
            int depth;
            lock (_gate)
            {
                while (_pending.Count == 0 && !_stopping) Monitor.Wait(_gate);
                if (_stopping) break;
                item = _pending.First!.Value;
                _pending.RemoveFirst();
                _current = item;
                depth = _pending.Count;
            }
            QueueDepthChanged?.Invoke(depth);
            try { item.Run(); }
            finally { lock (_gate) _current = null; }
        }
        List<IWorkItem> left;
        lock (_gate) { left = [.. _pending]; _pending.Clear(); }
        foreach (var item in left) item.Drop();
    }

    public void Dispose()
    {
        lock (_gate)
        {
            if (_stopping) return;
            _stopping = true;
            Monitor.PulseAll(_gate);
        }
        if (Thread.CurrentThread != _thread) _thread.Join(TimeSpan.FromSeconds(30));
    }

    private interface IWorkItem
    {
        LinkedListNode<IWorkItem>? Node { get; }
        void Run();
        void Drop();
    }

    private sealed class WorkItem<T>(Func<CancellationToken, T> work, CancellationToken ct, bool scoped) : IWorkItem
    {
        private readonly TaskCompletionSource<T> _tcs = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private CancellationTokenRegistration _registration;

        public LinkedListNode<IWorkItem>? Node { get; set; }
        public Task<T> Task => _tcs.Task;

        public void OnCancelled(Action withdraw) => _registration = ct.Register(withdraw);
        public void DisposeRegistration() => _registration.Dispose();

        public void Run()
        {
            try
            {
                if (ct.IsCancellationRequested) { _tcs.TrySetCanceled(ct); return; }
                T result;
                if (scoped)
                {
                    using var scope = torch.NewDisposeScope();
                    using var noGrad = torch.no_grad();
                    result = work(ct);
                }
                else
                {
                    using var noGrad = torch.no_grad();
                    result = work(ct);
                }
                _tcs.TrySetResult(result);
            }
            catch (OperationCanceledException) when (ct.IsCancellationRequested)
            {
                _tcs.TrySetCanceled(ct);
            }
            catch (Exception e)
            {
                _tcs.TrySetException(e);
            }
            finally
            {
                _registration.Dispose();
            }
        }

        public void Drop()
        {
            _tcs.TrySetCanceled(ct.IsCancellationRequested ? ct : new CancellationToken(true));
            // Not disposing the registration here: Drop may run inside its own callback.
        }
    }
}

/// <summary>The device queue is full; maps to RESOURCE_EXHAUSTED.</summary>
public sealed class CapacityExceededException(string message) : Exception(message);
