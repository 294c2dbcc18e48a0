using Grpc.Core;

namespace RealAlign.Server.Observability;

/// <summary>
/// Per-call fields for the one log line the interceptor writes when a call ends. Services fill in
/// what they know (<c>RequestLog.Of(context).Backbone = ...</c>).
/// </summary>
public sealed class RequestLog
{
    private static readonly object Key = new();

    public string? Backbone { get; set; }
    public int? Images { get; set; }
    public int? Steps { get; set; }
    public int? Width { get; set; }
    public int? Height { get; set; }

    public static RequestLog Of(ServerCallContext context)
    {
        if (context.UserState.TryGetValue(Key, out var existing)) return (RequestLog)existing;
        var log = new RequestLog();
        context.UserState[Key] = log;
        return log;
    }
}
