using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Imaging;

/// <summary>
/// HPSv2's evaluation transform: <c>image_transform(size, is_train=False, resize_longest_max=True)</c>
/// of its vendored open_clip fork (tgxs002/HPSv2 <c>hpsv2/src/open_clip/transform.py</c>), which
/// differs from open_clip 2.16's own by converting to a tensor BEFORE resizing:
/// <list type="number">
/// <item>ToTensor: float32 CHW, x / 255.</item>
/// <item>ResizeMaxSize: scale = S / max(H, W); when scale != 1, resize to (round(H·scale), round(W·scale))
/// (Python round, half to even) with torch bicubic interpolation (align_corners=False, no
/// antialiasing, no clamping), then zero-pad to S×S with left = pad_w // 2, top = pad_h // 2 and the
/// remainder right/bottom. When the longest side already equals S the image is neither resized nor
/// padded and keeps its shape (upstream behaviour, kept on purpose).</item>
/// <item>Normalize with the OpenAI CLIP mean/std (padding becomes −mean/std).</item>
/// </list>
/// The resize runs in <see cref="TorchBicubic"/> (torch 1.13's kernel, which the references come
/// from) rather than TorchSharp's interpolate, whose libtorch 2.10 weights differ by up to 2e-5.
/// Upstream keeps an RGBA image as 4 channels (<c>_convert_to_rgb_or_rgba</c>), which the model
/// cannot take; images here are always decoded to RGB.
/// </summary>
public sealed class HpsImageTransform
{
    public static readonly float[] OpenAiMean = [0.48145466f, 0.4578275f, 0.40821073f];
    public static readonly float[] OpenAiStd = [0.26862954f, 0.26130258f, 0.27577711f];

    public int ImageSize { get; }
    public float[] Mean { get; }
    public float[] Std { get; }

    public HpsImageTransform(int imageSize, float[]? mean = null, float[]? std = null)
    {
        if (imageSize <= 0) throw new ArgumentOutOfRangeException(nameof(imageSize), imageSize, "image size must be positive");
        ImageSize = imageSize;
        Mean = mean ?? OpenAiMean;
        Std = std ?? OpenAiStd;
        if (Mean.Length != 3 || Std.Length != 3) throw new ArgumentException("mean and std need 3 values (RGB)");
    }

    /// <summary>
    /// Builds the transform from an open_clip hub folder's <c>open_clip_config.json</c>: image size from
    /// <c>model_cfg.vision_cfg.image_size</c>, mean/std from <c>preprocess_cfg</c> (OpenAI's when absent).
    /// </summary>
    public static HpsImageTransform FromOpenClipConfig(string path)
    {
        if (Directory.Exists(path)) path = Path.Combine(path, "open_clip_config.json");
        var j = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        var size = j["model_cfg"]?["vision_cfg"]?["image_size"] ?? throw new InvalidDataException($"{path}: model_cfg.vision_cfg.image_size missing");
        int imageSize = size is JsonArray a ? a[0]!.GetValue<int>() : size.GetValue<int>();
        if (size is JsonArray b && b[0]!.GetValue<int>() != b[1]!.GetValue<int>())
            throw new NotSupportedException($"{path}: non-square image_size {size.ToJsonString()} is not supported by the resize-longest transform");
        float[]? Floats(JsonNode? n) => n is JsonArray arr ? arr.Select(x => (float)x!.GetValue<double>()).ToArray() : null;
        return new HpsImageTransform(imageSize, Floats(j["preprocess_cfg"]?["mean"]), Floats(j["preprocess_cfg"]?["std"]));
    }

    /// <summary>Output (height, width) after the resize step (before padding); the input size when no resize happens.</summary>
    public (int Height, int Width) ResizedSize(int height, int width)
    {
        double scale = ImageSize / (double)Math.Max(height, width);
        if (scale == 1.0) return (height, width);
        return ((int)Math.Round(height * scale, MidpointRounding.ToEven), (int)Math.Round(width * scale, MidpointRounding.ToEven));
    }

    /// <summary>uint8 [H, W, 3] → float32 [1, 3, S, S] (or [1, 3, H, W] when max(H, W) == S).</summary>
    public Tensor Apply(Tensor imageHwc)
    {
        if (imageHwc.dtype != ScalarType.Byte || imageHwc.dim() != 3 || imageHwc.shape[2] != 3)
            throw new ArgumentException($"expected an RGB uint8 image [H, W, 3], got {imageHwc.dtype} [{string.Join(",", imageHwc.shape)}]");
        int h = (int)imageHwc.shape[0], w = (int)imageHwc.shape[1];
        var rgb = imageHwc.cpu().contiguous().data<byte>().ToArray();
        var (chw, oh, ow) = ApplyBytes(rgb, w, h);
        return torch.tensor(chw, new long[] { 1, 3, oh, ow }, ScalarType.Float32);
    }

    /// <summary>Interleaved RGB bytes → channels-first float32 values and their (height, width).</summary>
    public (float[] Chw, int Height, int Width) ApplyBytes(byte[] rgb, int width, int height)
    {
        if (rgb.LongLength != (long)width * height * 3)
            throw new ArgumentException($"expected {(long)width * height * 3} RGB bytes for {width}x{height}, got {rgb.LongLength}");
        // ToTensor: img.float().div(255), channels first.
        long plane = (long)height * width;
        var x = new float[3 * plane];
        for (long p = 0; p < plane; p++)
            for (int c = 0; c < 3; c++)
                x[c * plane + p] = rgb[p * 3 + c] / 255f;

        int oh = height, ow = width;
        if (Math.Max(height, width) != ImageSize)
        {
            var (nh, nw) = ResizedSize(height, width);
            var resized = TorchBicubic.Resize(x, 3, height, width, nh, nw);
            int padH = ImageSize - nh, padW = ImageSize - nw, top = padH / 2, left = padW / 2;
            x = new float[3L * ImageSize * ImageSize];
            for (int c = 0; c < 3; c++)
                for (int y = 0; y < nh; y++)
                    Array.Copy(resized, ((long)c * nh + y) * nw, x, ((long)c * ImageSize + y + top) * ImageSize + left, nw);
            (oh, ow) = (ImageSize, ImageSize);
        }
        long outPlane = (long)oh * ow;
        for (int c = 0; c < 3; c++)
            for (long p = 0; p < outPlane; p++)
                x[c * outPlane + p] = (x[c * outPlane + p] - Mean[c]) / Std[c];
        return (x, oh, ow);
    }

    /// <summary>Encoded image bytes → the transformed tensor.</summary>
    public Tensor Apply(ReadOnlySpan<byte> encoded, ImageDecodeOptions? options = null)
    {
        using var img = ImageCodec.DecodeRgb(encoded, options);
        return Apply(img);
    }
}
