using RealAlign.Core.IO;
using RealAlign.Tests.Infrastructure;
using static TorchSharp.torch;

namespace RealAlign.Tests.IO;

public class SafeTensorsTests
{
    [Fact]
    public void ReadsGoldenFileAndRoundTripsAllDtypes()
    {
        using var c = Fixtures.Case("sd3_transformer");
        using var x = c.In("hidden_states");
        Assert.Equal(new long[] { 1, 16, 16, 16 }, x.shape);

        var tmp = Path.Combine(Path.GetTempPath(), $"st-{Guid.NewGuid():N}.safetensors");
        var tensors = new Dictionary<string, Tensor>
        {
            ["f32"] = x,
            ["f16"] = x.to_type(ScalarType.Float16),
            ["bf16"] = x.to_type(ScalarType.BFloat16),
            ["i64"] = arange(10, dtype: ScalarType.Int64),
            ["u8"] = arange(7, dtype: ScalarType.Byte),
        };
        SafeTensorsFile.Save(tmp, tensors, new Dictionary<string, string> { ["format"] = "pt" });
        using (var f = SafeTensorsFile.Open(tmp))
        {
            Assert.Equal("pt", f.Metadata["format"]);
            foreach (var (k, v) in tensors)
            {
                using var back = f.Load(k);
                Assert.Equal(v.dtype, back.dtype);
                Assert.True(back.to_type(ScalarType.Float64).allclose(v.to_type(ScalarType.Float64), 0, 0), k);
            }
        }
        File.Delete(tmp);
    }

    [Fact]
    public void TruncatedFileIsAFormatError()
    {
        var src = Path.Combine(Fixtures.Root, "sd3_transformer", "io.safetensors");
        var bytes = File.ReadAllBytes(src);
        var tmp = Path.Combine(Path.GetTempPath(), $"st-{Guid.NewGuid():N}.safetensors");
        File.WriteAllBytes(tmp, bytes[..(bytes.Length - 100)]);
        Assert.Throws<SafeTensorsFormatException>(() => SafeTensorsFile.Open(tmp).Dispose());
        File.WriteAllBytes(tmp, [1, 2, 3]);
        Assert.Throws<SafeTensorsFormatException>(() => SafeTensorsFile.Open(tmp).Dispose());
        File.Delete(tmp);
    }
}
