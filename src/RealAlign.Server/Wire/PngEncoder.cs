using SkiaSharp;

namespace RealAlign.Server.Wire;

/// <summary>
/// float [3, H, W] in [0, 1] → PNG bytes, quantised like diffusers' <c>numpy_to_pil</c>:
/// <c>(images * 255).round().astype("uint8")</c> in float32, where numpy rounds half to even.
/// Runs on request threads, never on the device thread.
/// </summary>
public static class PngEncoder
{
    public static byte[] Encode(ReadOnlySpan<float> chw, int height, int width)
    {
        var plane = checked(height * width);
        if (chw.Length != 3 * plane)
            throw new ArgumentException($"expected 3×{height}×{width} = {3 * plane} values, got {chw.Length}", nameof(chw));
        var pixels = new byte[4 * plane];
        var r = chw[..plane];
        var g = chw.Slice(plane, plane);
        var b = chw.Slice(2 * plane, plane);
        for (var i = 0; i < plane; i++)
        {
            pixels[4 * i] = Quantise(r[i]);
            pixels[4 * i + 1] = Quantise(g[i]);
            pixels[4 * i + 2] = Quantise(b[i]);
            pixels[4 * i + 3] = 255;
        }
        var info = new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Opaque);
        using var image = SKImage.FromPixelCopy(info, pixels);
        using var data = image.Encode(SKEncodedImageFormat.Png, 100);
        return data.ToArray();
    }

    /// <summary>round(clamp(x, 0, 1) · 255), half to even; NaN becomes 0.</summary>
    public static byte Quantise(float x)
    {
        if (!(x > 0f)) return 0;
        if (x >= 1f) return 255;
        return (byte)MathF.Round(x * 255f, MidpointRounding.ToEven);
    }
}
