using System.Globalization;
using System.Runtime.InteropServices;
using Google.Protobuf;
using TorchSharp;
using static TorchSharp.torch;
using WireTensor = RealAlign.V1.Tensor;

namespace RealAlign.Server.Wire;

/// <summary>
/// proto <c>realalign.v1.Tensor</c> ↔ torch tensors: a dtype name, a shape and the raw little-endian
/// row-major bytes (common.proto). Every malformed tensor becomes an <see cref="InvalidRequestException"/>
/// naming the field, so clients get INVALID_ARGUMENT with the reason.
/// </summary>
public static class TensorWire
{
    private static readonly Dictionary<string, (ScalarType Type, int ItemSize)> ByName = new()
    {
        ["float32"] = (ScalarType.Float32, 4),
        ["float16"] = (ScalarType.Float16, 2),
        ["bfloat16"] = (ScalarType.BFloat16, 2),
        ["int64"] = (ScalarType.Int64, 8),
        ["int32"] = (ScalarType.Int32, 4),
        ["uint8"] = (ScalarType.Byte, 1),
        ["bool"] = (ScalarType.Bool, 1),
    };

    public static IReadOnlyCollection<string> DTypeNames => ByName.Keys;

    public static string DTypeName(ScalarType type) =>
        ByName.FirstOrDefault(kv => kv.Value.Type == type).Key
        ?? throw new NotSupportedException($"dtype {type} has no wire name");

    /// <summary>Checks dtype, dims and byte length; returns the shape. Touches no torch state.</summary>
    public static long[] ValidateLayout(WireTensor? t, string field)
    {
        if (t is null) throw new InvalidRequestException($"{field}: tensor is missing");
        if (!ByName.TryGetValue(t.Dtype, out var dt))
            throw new InvalidRequestException($"{field}: unknown dtype '{t.Dtype}' (expected one of {string.Join(", ", ByName.Keys)})");
        var shape = t.Shape.ToArray();
        long count = 1;
        for (var i = 0; i < shape.Length; i++)
        {
            if (shape[i] < 0) throw new InvalidRequestException($"{field}: dimension {i} is negative ({shape[i]}) in shape {Format(shape)}");
            try { count = checked(count * shape[i]); }
            catch (OverflowException) { throw new InvalidRequestException($"{field}: shape {Format(shape)} is too large"); }
        }
        long expected;
        try { expected = checked(count * dt.ItemSize); }
        catch (OverflowException) { throw new InvalidRequestException($"{field}: shape {Format(shape)} is too large"); }
        if (t.Data.Length != expected)
            throw new InvalidRequestException(
                $"{field}: {t.Data.Length} bytes of data, but shape {Format(shape)} × {t.Dtype} ({dt.ItemSize} bytes) needs {expected}");
        return shape;
    }

    /// <summary>
    /// Checks a float32 tensor of exactly <paramref name="expectedShape"/> with only finite values
    /// (what prior_noise must be).
    /// </summary>
    public static void ValidateFloat32(WireTensor? t, long[] expectedShape, string field)
    {
        if (t is not null && t.Dtype != "float32")
            throw new InvalidRequestException($"{field}: dtype must be float32, got '{t.Dtype}'");
        var shape = ValidateLayout(t, field);
        if (!shape.SequenceEqual(expectedShape))
            throw new InvalidRequestException($"{field}: expected shape {Format(expectedShape)}, got {Format(shape)}");
        var values = AsFloats(t!);
        for (var i = 0; i < values.Length; i++)
            if (!float.IsFinite(values[i]))
                throw new InvalidRequestException($"{field}: element {i} is {values[i].ToString(CultureInfo.InvariantCulture)} (values must be finite)");
    }

    /// <summary>A CPU torch tensor holding a copy of the wire bytes (validated first).</summary>
    public static Tensor ToTorch(WireTensor t, string field)
    {
        var shape = ValidateLayout(t, field);
        var result = torch.empty(shape, ByName[t.Dtype].Type, torch.CPU);
        if (t.Data.Length > 0) t.Data.Span.CopyTo(result.bytes);
        return result;
    }

    /// <summary>Copies any tensor (any device, any layout) to the wire.</summary>
    public static WireTensor FromTorch(Tensor t)
    {
        var name = DTypeName(t.dtype);
        using var detached = t.detach();
        using var cpu = detached.cpu();
        using var contiguous = cpu.contiguous();
        var wire = new WireTensor { Dtype = name, Data = ByteString.CopyFrom(contiguous.bytes) };
        wire.Shape.AddRange(t.shape);
        return wire;
    }

    /// <summary>A managed float32 copy of any tensor (call on the device thread, inside its dispose scope).</summary>
    public static float[] ToFloats(Tensor t)
    {
        using var detached = t.detach();
        using var f = detached.to(ScalarType.Float32, torch.CPU);
        using var contiguous = f.contiguous();
        return contiguous.data<float>().ToArray();
    }

    public static WireTensor FromFloats(ReadOnlySpan<float> data, long[] shape)
    {
        var wire = new WireTensor { Dtype = "float32", Data = ByteString.CopyFrom(MemoryMarshal.AsBytes(data)) };
        wire.Shape.AddRange(shape);
        return wire;
    }

    /// <summary>The float32 payload viewed as floats (little-endian hosts only, like every torch build we ship).</summary>
    public static ReadOnlySpan<float> AsFloats(WireTensor t)
    {
        if (t.Dtype != "float32") throw new InvalidOperationException($"AsFloats on a {t.Dtype} tensor");
        return MemoryMarshal.Cast<byte, float>(t.Data.Span);
    }

    public static string Format(IEnumerable<long> shape) => "[" + string.Join(", ", shape) + "]";
}
