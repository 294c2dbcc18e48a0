using System.Runtime.InteropServices;
using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Imaging;

/// <summary>Why an image was refused.</summary>
public enum ImageRejection
{
    /// <summary>The bytes are not a PNG, JPEG or WebP image Skia can read.</summary>
    Undecodable,
    /// <summary>The header is readable but the pixel data ends early or is corrupt.</summary>
    Truncated,
    /// <summary>The header declares a width or height of 0.</summary>
    Empty,
    /// <summary>The header declares more pixels than <see cref="ImageDecodeOptions.MaxPixels"/>.</summary>
    TooLarge,
}

/// <summary>An image the service will not decode; the message says what to send instead.</summary>
public sealed class ImageDecodeException(ImageRejection reason, string message) : Exception(message)
{
    public ImageRejection Reason { get; } = reason;
}

/// <summary>Limits applied before any pixel is decoded.</summary>
public sealed record ImageDecodeOptions
{
    /// <summary>
    /// Largest width × height accepted, read from the header before decoding (decompression-bomb
    /// guard; PIL's own default warning threshold is 89,478,485 pixels).
    /// </summary>
    public long MaxPixels { get; init; } = 89_478_485;

    public static ImageDecodeOptions Default { get; } = new();
}

/// <summary>
/// PNG/JPEG/WebP bytes ↔ RGB uint8 tensors with SkiaSharp, matching PIL's
/// <c>Image.open(...).convert("RGB")</c>: alpha is dropped without premultiplying, no colour
/// management is applied (no ICC conversion; PIL ignores embedded profiles too) and the EXIF
/// orientation is not applied (PIL's <c>Image.open</c> does not apply it either).
/// </summary>
public static class ImageCodec
{
    /// <summary>Reads width and height from the header only; throws <see cref="ImageDecodeException"/> if unreadable.</summary>
    public static (int Width, int Height) ReadSize(ReadOnlySpan<byte> encoded)
    {
        using var data = SKData.CreateCopy(encoded);
        using var codec = OpenCodec(data);
        return (codec.Info.Width, codec.Info.Height);
    }

    /// <summary>Decodes an image to uint8 [H, W, 3] (RGB) on the CPU.</summary>
    public static Tensor DecodeRgb(ReadOnlySpan<byte> encoded, ImageDecodeOptions? options = null)
    {
        var (pixels, width, height) = DecodeRgbBytes(encoded, options);
        return torch.tensor(pixels, new long[] { height, width, 3 }, ScalarType.Byte);
    }

    /// <summary>Decodes an image to interleaved RGB bytes (row-major, 3 bytes per pixel).</summary>
    public static (byte[] Rgb, int Width, int Height) DecodeRgbBytes(ReadOnlySpan<byte> encoded, ImageDecodeOptions? options = null)
    {
        options ??= ImageDecodeOptions.Default;
        if (encoded.Length == 0)
            throw new ImageDecodeException(ImageRejection.Undecodable, "the image is empty (0 bytes); send a PNG, JPEG or WebP file");
        using var data = SKData.CreateCopy(encoded);
        using var codec = OpenCodec(data);
        int width = codec.Info.Width, height = codec.Info.Height;
        if (width <= 0 || height <= 0)
            throw new ImageDecodeException(ImageRejection.Empty, $"the image header declares a {width}x{height} image; send an image with at least one pixel");
        long count = (long)width * height;
        if (count > options.MaxPixels)
            throw new ImageDecodeException(ImageRejection.TooLarge,
                $"the image header declares {width}x{height} = {count} pixels, more than the limit of {options.MaxPixels}; downscale it before sending");

        // Unpremul RGBA without a colour space: Skia hands back the stored samples unchanged,
        // the same values PIL reads.
        var info = new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        var rgba = new byte[count * 4];
        var handle = GCHandle.Alloc(rgba, GCHandleType.Pinned);
        SKCodecResult result;
        try { result = codec.GetPixels(info, handle.AddrOfPinnedObject()); }
        finally { handle.Free(); }
        if (result == SKCodecResult.IncompleteInput || result == SKCodecResult.ErrorInInput)
            throw new ImageDecodeException(ImageRejection.Truncated,
                $"the {codec.EncodedFormat} image ({width}x{height}) is truncated or corrupt ({result}); re-export or re-upload the complete file");
        if (result != SKCodecResult.Success)
            throw new ImageDecodeException(ImageRejection.Undecodable,
                $"the {codec.EncodedFormat} image ({width}x{height}) could not be decoded ({result}); send an 8-bit PNG, JPEG or WebP file");

        var rgb = new byte[count * 3];
        for (long p = 0; p < count; p++)
        {
            rgb[p * 3] = rgba[p * 4];
            rgb[p * 3 + 1] = rgba[p * 4 + 1];
            rgb[p * 3 + 2] = rgba[p * 4 + 2];
        }
        return (rgb, width, height);
    }

    private static SKCodec OpenCodec(SKData data)
    {
        // The codec takes ownership of the stream (and disposes it with itself).
        var codec = SKCodec.Create(new SKMemoryStream(data), out var result);
        if (codec is null)
        {
            var reason = result == SKCodecResult.IncompleteInput ? ImageRejection.Truncated : ImageRejection.Undecodable;
            throw new ImageDecodeException(reason, reason == ImageRejection.Truncated
                ? $"the image header is incomplete ({data.Size} bytes, {result}); re-upload the complete file"
                : $"the bytes ({data.Size}) are not a PNG, JPEG or WebP image Skia can read ({result}); send one of those formats");
        }
        var fmt = codec.EncodedFormat;
        if (fmt is not (SKEncodedImageFormat.Png or SKEncodedImageFormat.Jpeg or SKEncodedImageFormat.Webp))
        {
            codec.Dispose();
            throw new ImageDecodeException(ImageRejection.Undecodable, $"{fmt} images are not accepted; send a PNG, JPEG or WebP file");
        }
        return codec;
    }

    /// <summary>
    /// Encodes an image tensor as PNG: uint8 [H, W, 3], or float [3, H, W] / [1, 3, H, W] in [0, 1],
    /// which is clamped and rounded like diffusers' <c>VaeImageProcessor.numpy_to_pil</c>
    /// (<c>(x * 255).round().astype("uint8")</c>, after <c>denormalize</c>'s clamp).
    /// </summary>
    public static byte[] EncodePng(Tensor image)
    {
        var (rgb, width, height) = ToRgbBytes(image);
        return EncodeRgb(rgb, width, height, SKEncodedImageFormat.Png, 100);
    }

    /// <summary>Encodes interleaved RGB bytes (row-major) as PNG or JPEG.</summary>
    public static byte[] EncodeRgb(byte[] rgb, int width, int height, SKEncodedImageFormat format, int quality)
    {
        if (width <= 0 || height <= 0) throw new ArgumentException($"cannot encode a {width}x{height} image");
        if (rgb.LongLength != (long)width * height * 3)
            throw new ArgumentException($"expected {(long)width * height * 3} RGB bytes for {width}x{height}, got {rgb.LongLength}");
        var rgba = new byte[(long)width * height * 4];
        for (long p = 0, n = (long)width * height; p < n; p++)
        {
            rgba[p * 4] = rgb[p * 3];
            rgba[p * 4 + 1] = rgb[p * 3 + 1];
            rgba[p * 4 + 2] = rgb[p * 3 + 2];
            rgba[p * 4 + 3] = 255;
        }
        var info = new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Opaque);
        var handle = GCHandle.Alloc(rgba, GCHandleType.Pinned);
        try
        {
            using var pixmap = new SKPixmap(info, handle.AddrOfPinnedObject(), width * 4);
            using var encoded = pixmap.Encode(format, quality)
                ?? throw new InvalidOperationException($"Skia could not encode a {width}x{height} image as {format}");
            return encoded.ToArray();
        }
        finally { handle.Free(); }
    }

    /// <summary>uint8 [H, W, 3] or float [3, H, W] / [1, 3, H, W] in [0, 1] → interleaved RGB bytes.</summary>
    public static (byte[] Rgb, int Width, int Height) ToRgbBytes(Tensor image)
    {
        using var scope = NewDisposeScope();
        Tensor hwc;
        if (image.dtype == ScalarType.Byte)
        {
            if (image.dim() != 3 || image.shape[2] != 3)
                throw new ArgumentException($"a uint8 image must be [H, W, 3], got [{string.Join(",", image.shape)}]");
            hwc = image;
        }
        else if (image.is_floating_point())
        {
            var chw = image.dim() == 4 && image.shape[0] == 1 ? image[0] : image;
            if (chw.dim() != 3 || chw.shape[0] != 3)
                throw new ArgumentException($"a float image must be [3, H, W] or [1, 3, H, W], got [{string.Join(",", image.shape)}]");
            hwc = chw.detach().to(ScalarType.Float32).clamp(0, 1).mul(255).round().to(ScalarType.Byte).permute(1, 2, 0);
        }
        else throw new ArgumentException($"cannot encode a {image.dtype} image; use uint8 [H, W, 3] or float [3, H, W]");
        var bytes = hwc.cpu().contiguous().data<byte>().ToArray();
        return (bytes, (int)hwc.shape[1], (int)hwc.shape[0]);
    }
}
