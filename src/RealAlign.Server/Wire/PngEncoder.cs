using RealAlign.Core.Imaging;
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
        var rgb = new byte[3 * plane];
        for (var i = 0; i < plane; i++)
        {
            rgb[3 * i] = Quantise(chw[i]);
            rgb[3 * i + 1] = Quantise(chw[plane + i]);
            rgb[3 * i + 2] = Quantise(chw[2 * plane + i]);
        }
        return ImageCodec.EncodeRgb(rgb, width, height, SKEncodedImageFormat.Png, 100);
    }

    /// <summary>round(clamp(x, 0, 1) · 255), half to even; NaN becomes 0.</summary>
    public static byte Quantise(float x)
    {
        if (!(x > 0f)) return 0;
        if (x >= 1f) return 255;
        return (byte)MathF.Round(x * 255f, MidpointRounding.ToEven);
    }
}
