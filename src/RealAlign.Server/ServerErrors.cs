namespace RealAlign.Server;

// Domain errors raised by the server's own code. Interceptors/ExceptionInterceptor.cs is the single
// place that turns them (and CapacityExceededException) into gRPC status codes.

/// <summary>A request field is malformed or out of range; maps to INVALID_ARGUMENT. The message names the field.</summary>
public sealed class InvalidRequestException(string message) : Exception(message);

/// <summary>The named backbone is not loaded; maps to NOT_FOUND.</summary>
public sealed class BackboneNotFoundException(string name, IEnumerable<string> loaded)
    : Exception($"backbone '{name}' is not loaded; loaded backbones: {string.Join(", ", loaded.DefaultIfEmpty("(none)"))}");

/// <summary>Backbones are still loading; maps to UNAVAILABLE (clients retry).</summary>
public sealed class NotReadyException(string message) : Exception(message);

/// <summary>The request asks for something this server does not offer yet; maps to UNIMPLEMENTED.</summary>
public sealed class UnsupportedFeatureException(string message) : Exception(message);
