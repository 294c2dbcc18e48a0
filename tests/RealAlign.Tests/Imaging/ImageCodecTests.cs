using System.Runtime.InteropServices;
using RealAlign.Core.Imaging;
using RealAlign.Tests.Infrastructure;
using SkiaSharp;
using static TorchSharp.torch;

namespace RealAlign.Tests.Imaging;

public class ImageCodecTests
{
    private static byte[] GoldenPng(out Tensor pixels)
    {
        using var c = Fixtures.Case("open_clip_hps");
        var file = c.Json["images"]![0]!["file"]!.GetValue<string>();
        pixels = c.In("image_0");
        return File.ReadAllBytes(c.PathOf(file));
    }

    [Fact]
    public void DecodesPngLikePil()
    {
        var png = GoldenPng(out var expected);
        using var _ = expected;
        using var got = ImageCodec.DecodeRgb(png);
        Assert.Equal(expected.shape, got.shape);
        Assert.True(got.eq(expected).all().item<bool>());
        Assert.Equal(((int)expected.shape[1], (int)expected.shape[0]), ImageCodec.ReadSize(png));
    }

    [Fact]
    public void DropsAlphaWithoutPremultiplying()
    {
        // RGBA pixels with partial alpha, stored unpremultiplied in a PNG: PIL's convert("RGB") keeps RGB as stored.
        const int w = 5, h = 3;
        var rgba = new byte[w * h * 4];
        var rng = new Random(7);
        rng.NextBytes(rgba);
        for (int p = 0; p < w * h; p++) rgba[p * 4 + 3] = (byte)(p * 17 % 256);
        rgba[3] = 0; // a fully transparent pixel keeps its colour too
        var png = EncodeUnpremulRgbaPng(rgba, w, h);
        var (rgb, gw, gh) = ImageCodec.DecodeRgbBytes(png);
        Assert.Equal((w, h), (gw, gh));
        for (int p = 0; p < w * h; p++)
            for (int ch = 0; ch < 3; ch++)
                Assert.Equal(rgba[p * 4 + ch], rgb[p * 3 + ch]);
    }

    [Fact]
    public void RefusesGarbageTruncatedEmptyAndOversizedImages()
    {
        var png = GoldenPng(out var px);
        px.Dispose();

        var garbage = Assert.Throws<ImageDecodeException>(() => ImageCodec.DecodeRgb("not an image at all"u8.ToArray()));
        Assert.Equal(ImageRejection.Undecodable, garbage.Reason);
        Assert.Equal(ImageRejection.Undecodable, Assert.Throws<ImageDecodeException>(() => ImageCodec.DecodeRgb([])).Reason);

        var truncated = Assert.Throws<ImageDecodeException>(() => ImageCodec.DecodeRgb(png.AsSpan(0, png.Length / 2)));
        Assert.Equal(ImageRejection.Truncated, truncated.Reason);
        Assert.Contains("truncated", truncated.Message);

        var (w, h) = ImageCodec.ReadSize(png);
        var big = Assert.Throws<ImageDecodeException>(() => ImageCodec.DecodeRgb(png, new ImageDecodeOptions { MaxPixels = (long)w * h - 1 }));
        Assert.Equal(ImageRejection.TooLarge, big.Reason);
        Assert.Contains($"{w}x{h}", big.Message);
        // The guard reads the header only: a bomb whose pixel data is missing is refused as too large, not as truncated.
        var bomb = Assert.Throws<ImageDecodeException>(() => ImageCodec.DecodeRgb(PngHeaderOnly(100_000, 100_000)));
        Assert.Equal(ImageRejection.TooLarge, bomb.Reason);

        Assert.Throws<ImageDecodeException>(() => ImageCodec.DecodeRgb(PngHeaderOnly(0, 0)));
        Assert.Throws<ImageDecodeException>(() => ImageCodec.DecodeRgb(PngHeaderOnly(16, 0)));
    }

    [Fact]
    public void EncodesFloatChwWithDiffusersRoundingAndRoundTrips()
    {
        using var scope = NewDisposeScope();
        var x = rand(3, 7, 9, generator: new TorchSharp.torch.Generator(3)) * 1.2 - 0.1; // some values outside [0, 1]
        var png = ImageCodec.EncodePng(x);
        var back = ImageCodec.DecodeRgb(png);
        var expected = x.clamp(0, 1).mul(255).round().to(ScalarType.Byte).permute(1, 2, 0);
        Assert.True(back.eq(expected).all().item<bool>());
        var again = ImageCodec.DecodeRgb(ImageCodec.EncodePng(back));
        Assert.True(again.eq(back).all().item<bool>());
        Assert.True(ImageCodec.DecodeRgb(ImageCodec.EncodePng(x.unsqueeze(0))).eq(back).all().item<bool>());
    }

    [Fact]
    public void DecodesJpegAndLosslessWebp()
    {
        const int w = 12, h = 7;
        var rgb = new byte[w * h * 3];
        new Random(11).NextBytes(rgb);
        var jpeg = ImageCodec.EncodeRgb(rgb, w, h, SKEncodedImageFormat.Jpeg, 95);
        var (_, jw, jh) = ImageCodec.DecodeRgbBytes(jpeg);
        Assert.Equal((w, h), (jw, jh));

        var rgba = new byte[w * h * 4];
        for (int p = 0; p < w * h; p++) { rgba[p * 4] = rgb[p * 3]; rgba[p * 4 + 1] = rgb[p * 3 + 1]; rgba[p * 4 + 2] = rgb[p * 3 + 2]; rgba[p * 4 + 3] = 255; }
        var info = new SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Opaque);
        var handle = GCHandle.Alloc(rgba, GCHandleType.Pinned);
        byte[] webp;
        try
        {
            using var pixmap = new SKPixmap(info, handle.AddrOfPinnedObject(), w * 4);
            using var data = pixmap.Encode(new SKWebpEncoderOptions(SKWebpEncoderCompression.Lossless, 100))!;
            webp = data.ToArray();
        }
        finally { handle.Free(); }
        var (back, ww, wh) = ImageCodec.DecodeRgbBytes(webp);
        Assert.Equal((w, h), (ww, wh));
        Assert.Equal(rgb, back);
    }

    private static byte[] EncodeUnpremulRgbaPng(byte[] rgba, int w, int h)
    {
        var info = new SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        var handle = GCHandle.Alloc(rgba, GCHandleType.Pinned);
        try
        {
            using var pixmap = new SKPixmap(info, handle.AddrOfPinnedObject(), w * 4);
            using var data = pixmap.Encode(SKEncodedImageFormat.Png, 100)!;
            return data.ToArray();
        }
        finally { handle.Free(); }
    }

    /// <summary>
    /// A PNG whose IHDR declares the given size, followed by the start of an IDAT chunk (a zlib
    /// header and nothing else): enough for a decoder to read the header, far too little pixel data.
    /// </summary>
    private static byte[] PngHeaderOnly(int width, int height)
    {
        var bytes = new List<byte> { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A };
        void Chunk(string type, byte[] data)
        {
            var body = System.Text.Encoding.ASCII.GetBytes(type).Concat(data).ToArray();
            bytes.AddRange(BigEndian(data.Length));
            bytes.AddRange(body);
            bytes.AddRange(BigEndian((int)Crc32(body)));
        }
        Chunk("IHDR", [.. BigEndian(width), .. BigEndian(height), 8, 2, 0, 0, 0]); // 8-bit RGB
        Chunk("IDAT", [0x78, 0x9C, 0x00]);
        return bytes.ToArray();
    }

    private static byte[] BigEndian(int v) => [(byte)(v >> 24), (byte)(v >> 16), (byte)(v >> 8), (byte)v];

    private static uint Crc32(byte[] data)
    {
        uint crc = 0xFFFFFFFF;
        foreach (var b in data)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++) crc = (crc & 1) != 0 ? (crc >> 1) ^ 0xEDB88320u : crc >> 1;
        }
        return ~crc;
    }
}
