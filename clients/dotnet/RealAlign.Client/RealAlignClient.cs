using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;
using RealAlign.V1;

namespace RealAlign.Client;

/// <summary>One finished sample: the PNG (unless omitted), the exact prior noise x_T and its seed.</summary>
public sealed record GeneratedSample(int Index, long Seed, byte[]? Png, float[] PriorNoise, long[] PriorNoiseShape, GeneratedImage Raw);

/// <summary>
/// Typed access to a RealAlign server (<c>http://host:50051</c>, HTTP/2 cleartext). The generated
/// stub stays available as <see cref="Generation"/> for anything this wrapper does not cover.
/// </summary>
public sealed class RealAlignClient : IDisposable
{
    /// <summary>Matches the server's limit, so a 1024² float image tensor (12 MB) fits.</summary>
    public const int MaxMessageBytes = 256 * 1024 * 1024;

    private readonly GrpcChannel? _ownedChannel;

    public Generation.GenerationClient Generation { get; }

    public RealAlignClient(string address)
    {
        _ownedChannel = GrpcChannel.ForAddress(address, new GrpcChannelOptions
        {
            MaxReceiveMessageSize = MaxMessageBytes,
            MaxSendMessageSize = MaxMessageBytes,
        });
        Generation = new Generation.GenerationClient(_ownedChannel);
    }

    public RealAlignClient(ChannelBase channel) => Generation = new Generation.GenerationClient(channel);

    public async Task<IReadOnlyList<BackboneInfo>> ListBackbonesAsync(CancellationToken ct = default) =>
        (await Generation.ListBackbonesAsync(new ListBackbonesRequest(), cancellationToken: ct)).Backbones;

    /// <summary>The raw event stream: progress events, then one image per sample.</summary>
    public async IAsyncEnumerable<GenerateEvent> StreamAsync(
        GenerateRequest request, DateTime? deadline = null, [EnumeratorCancellation] CancellationToken ct = default)
    {
        using var call = Generation.Generate(request, deadline: deadline, cancellationToken: ct);
        await foreach (var e in call.ResponseStream.ReadAllAsync(ct))
            yield return e;
    }

    /// <summary>Runs a request to the end and returns its samples in index order.</summary>
    public async Task<IReadOnlyList<GeneratedSample>> GenerateAsync(
        GenerateRequest request, IProgress<Progress>? progress = null, DateTime? deadline = null, CancellationToken ct = default)
    {
        var samples = new List<GeneratedSample>();
        await foreach (var e in StreamAsync(request, deadline, ct))
        {
            if (e.EventCase == GenerateEvent.EventOneofCase.Progress) progress?.Report(e.Progress);
            else if (e.EventCase == GenerateEvent.EventOneofCase.Image)
            {
                var img = e.Image;
                samples.Add(new GeneratedSample(
                    (int)img.Index, img.Seed, img.ImagePng.IsEmpty ? null : img.ImagePng.ToByteArray(),
                    WireTensors.ToFloats(img.PriorNoise), img.PriorNoise.Shape.ToArray(), img));
            }
        }
        return samples.OrderBy(s => s.Index).ToList();
    }

    public void Dispose() => _ownedChannel?.Dispose();
}

/// <summary>proto Tensor ↔ managed arrays (float32 only; raw little-endian bytes).</summary>
public static class WireTensors
{
    public static float[] ToFloats(V1.Tensor t)
    {
        if (t.Dtype != "float32") throw new ArgumentException($"expected a float32 tensor, got {t.Dtype}");
        return MemoryMarshal.Cast<byte, float>(t.Data.Span).ToArray();
    }

    public static V1.Tensor FromFloats(ReadOnlySpan<float> data, params long[] shape)
    {
        var count = shape.Aggregate(1L, (a, b) => a * b);
        if (count != data.Length) throw new ArgumentException($"{data.Length} values do not fill shape [{string.Join(", ", shape)}]");
        var t = new V1.Tensor { Dtype = "float32", Data = ByteString.CopyFrom(MemoryMarshal.AsBytes(data)) };
        t.Shape.AddRange(shape);
        return t;
    }
}
