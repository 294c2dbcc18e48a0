using Google.Protobuf;
using RealAlign.Server;
using RealAlign.Server.Wire;
using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;
using WireTensor = RealAlign.V1.Tensor;

namespace RealAlign.Tests.Server;

public sealed class WireTests
{
    [Theory]
    [InlineData("float32")]
    [InlineData("float16")]
    [InlineData("bfloat16")]
    [InlineData("int64")]
    [InlineData("int32")]
    [InlineData("uint8")]
    [InlineData("bool")]
    public void Every_wire_dtype_round_trips(string dtype)
    {
        using var scope = torch.NewDisposeScope();
        var type = dtype switch
        {
            "float32" => ScalarType.Float32, "float16" => ScalarType.Float16, "bfloat16" => ScalarType.BFloat16,
            "int64" => ScalarType.Int64, "int32" => ScalarType.Int32, "uint8" => ScalarType.Byte, _ => ScalarType.Bool,
        };
        var original = (torch.arange(24, ScalarType.Float32).reshape(2, 3, 4) % 7).to(type);
        var strided = original.transpose(0, 2); // non-contiguous on purpose

        var wire = TensorWire.FromTorch(strided);
        Assert.Equal(dtype, wire.Dtype);
        Assert.Equal([4L, 3, 2], wire.Shape);
        var back = TensorWire.ToTorch(wire, "t");

        Assert.Equal(type, back.dtype);
        Assert.True(strided.eq(back).all().item<bool>());
    }

    [Fact]
    public void Malformed_tensors_are_invalid_arguments_naming_the_field()
    {
        var ok = new WireTensor { Dtype = "float32", Data = ByteString.CopyFrom(new byte[24]) };
        ok.Shape.Add([2, 3]);
        Assert.Equal([2L, 3], TensorWire.ValidateLayout(ok, "x"));

        var unknown = ok.Clone(); unknown.Dtype = "complex64";
        Assert.Contains("x: unknown dtype 'complex64'", Assert.Throws<InvalidRequestException>(() => TensorWire.ValidateLayout(unknown, "x")).Message);

        var negative = ok.Clone(); negative.Shape[1] = -3;
        Assert.Contains("x: dimension 1 is negative (-3)", Assert.Throws<InvalidRequestException>(() => TensorWire.ValidateLayout(negative, "x")).Message);

        var wrongLength = ok.Clone(); wrongLength.Dtype = "int64";
        Assert.Contains("x: 24 bytes of data, but shape [2, 3] × int64 (8 bytes) needs 48",
            Assert.Throws<InvalidRequestException>(() => TensorWire.ToTorch(wrongLength, "x")).Message);

        var huge = ok.Clone(); huge.Shape.Clear(); huge.Shape.Add([long.MaxValue, 4]);
        Assert.Contains("too large", Assert.Throws<InvalidRequestException>(() => TensorWire.ValidateLayout(huge, "x")).Message);

        Assert.Contains("x: tensor is missing", Assert.Throws<InvalidRequestException>(() => TensorWire.ValidateLayout(null, "x")).Message);
    }

    [Fact]
    public void Png_quantises_like_diffusers_numpy_to_pil()
    {
        // (x * 255).round() in float32, numpy rounds half to even; out-of-range values are clamped.
        Assert.Equal(0, PngEncoder.Quantise(-0.5f));
        Assert.Equal(0, PngEncoder.Quantise(float.NaN));
        Assert.Equal(255, PngEncoder.Quantise(1.5f));
        Assert.Equal(128, PngEncoder.Quantise(0.5f)); // 127.5 → 128 (even)
        Assert.Equal(2, PngEncoder.Quantise(2.5f / 255f)); // 2.5 → 2 (even)

        float[] chw = [0f, 1f, 0.25f, 0.75f, /* g */ 1f, 0f, 0.5f, 0.5f, /* b */ 0.2f, 0.4f, 0.6f, 0.8f];
        using var bitmap = SKBitmap.Decode(PngEncoder.Encode(chw, 2, 2));
        Assert.Equal((2, 2), (bitmap.Width, bitmap.Height));
        Assert.Equal(new SKColor(0, 255, 51), bitmap.GetPixel(0, 0));
        Assert.Equal(new SKColor(255, 0, 102), bitmap.GetPixel(1, 0));
        Assert.Equal(new SKColor(64, 128, 153), bitmap.GetPixel(0, 1));
        Assert.Equal(new SKColor(191, 128, 204), bitmap.GetPixel(1, 1));
    }
}
