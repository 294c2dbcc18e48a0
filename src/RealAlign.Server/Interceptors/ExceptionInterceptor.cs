using System.Diagnostics;
using Grpc.Core;
using Grpc.Core.Interceptors;
using RealAlign.Server.Execution;
using RealAlign.Server.Observability;

namespace RealAlign.Server.Interceptors;

/// <summary>
/// The one place where exceptions become gRPC status codes. It also writes the single log line per
/// call (rpc, backbone, images, steps, duration, status) and counts calls by status for /metrics.
/// </summary>
public sealed class ExceptionInterceptor(ILogger<ExceptionInterceptor> log, ServerMetrics metrics) : Interceptor
{
    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(
        TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation) =>
        Observe(context, () => continuation(request, context));

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(
        TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context,
        ServerStreamingServerMethod<TRequest, TResponse> continuation) =>
        Observe(context, async () => { await continuation(request, responseStream, context); return true; });

    public override Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(
        IAsyncStreamReader<TRequest> requestStream, ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation) =>
        Observe(context, () => continuation(requestStream, context));

    public override Task DuplexStreamingServerHandler<TRequest, TResponse>(
        IAsyncStreamReader<TRequest> requestStream, IServerStreamWriter<TResponse> responseStream, ServerCallContext context,
        DuplexStreamingServerMethod<TRequest, TResponse> continuation) =>
        Observe(context, async () => { await continuation(requestStream, responseStream, context); return true; });

    private async Task<T> Observe<T>(ServerCallContext context, Func<Task<T>> call)
    {
        var rpc = RpcName(context.Method);
        var fields = RequestLog.Of(context);
        var clock = Stopwatch.StartNew();
        var status = StatusCode.OK;
        Exception? failure = null;
        try
        {
            return await call();
        }
        catch (Exception e)
        {
            failure = e;
            var mapped = Map(e, context);
            status = mapped.StatusCode;
            throw new RpcException(mapped);
        }
        finally
        {
            var seconds = clock.Elapsed.TotalSeconds;
            metrics.Requests.WithLabels(rpc, status.ToString()).Inc();
            metrics.RequestDuration.WithLabels(rpc).Observe(seconds);
            var level = status == StatusCode.Internal ? LogLevel.Error
                : rpc.StartsWith("grpc.", StringComparison.Ordinal) ? LogLevel.Debug
                : LogLevel.Information;
            log.Log(level, status == StatusCode.Internal ? failure : null,
                "rpc={Rpc} backbone={Backbone} images={Images} steps={Steps} size={Width}x{Height} duration_ms={DurationMs:F0} status={Status}{Detail}",
                rpc, fields.Backbone ?? "-", fields.Images, fields.Steps, fields.Width, fields.Height, seconds * 1000, status,
                failure is null || status == StatusCode.Internal ? "" : " detail=\"" + failure.Message + "\"");
        }
    }

    /// <summary>Domain exception → status. Messages of client errors go back verbatim; they name the field.</summary>
    public static Status Map(Exception e, ServerCallContext context) => e switch
    {
        RpcException rpc => rpc.Status,
        InvalidRequestException => new Status(StatusCode.InvalidArgument, e.Message),
        BackboneNotFoundException => new Status(StatusCode.NotFound, e.Message),
        Core.Rewards.RewardNotFoundException => new Status(StatusCode.NotFound, e.Message),
        CapacityExceededException => new Status(StatusCode.ResourceExhausted, e.Message),
        NotReadyException => new Status(StatusCode.Unavailable, e.Message),
        UnsupportedFeatureException => new Status(StatusCode.Unimplemented, e.Message),
        OperationCanceledException when context.Deadline <= DateTime.UtcNow => new Status(StatusCode.DeadlineExceeded, "deadline exceeded"),
        OperationCanceledException => new Status(StatusCode.Cancelled, "cancelled by the client"),
        RealAlign.Core.Lora.AdapterException a => new Status(a.Kind switch
        {
            RealAlign.Core.Lora.AdapterErrorKind.NotFound => StatusCode.NotFound,
            RealAlign.Core.Lora.AdapterErrorKind.PermissionDenied => StatusCode.PermissionDenied,
            RealAlign.Core.Lora.AdapterErrorKind.ResourceExhausted => StatusCode.ResourceExhausted,
            _ => StatusCode.InvalidArgument,
        }, e.Message),
        RealAlign.Core.Lora.LoraFormatException => new Status(StatusCode.InvalidArgument, e.Message),
        ArgumentException => new Status(StatusCode.InvalidArgument, e.Message),
        _ when e.Message.Contains("out of memory", StringComparison.OrdinalIgnoreCase) =>
            new Status(StatusCode.ResourceExhausted, "the device ran out of memory; try fewer images or a smaller size"),
        _ => new Status(StatusCode.Internal, $"internal error: {e.GetType().Name}: {e.Message}"),
    };

    /// <summary>"/realalign.v1.Generation/Generate" → "realalign.v1.Generation/Generate".</summary>
    private static string RpcName(string method) => method.TrimStart('/');
}
