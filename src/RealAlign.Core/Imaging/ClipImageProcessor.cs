using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Imaging;

/// <summary>
/// transformers' <c>preprocessor_config.json</c> for CLIPImageProcessor, with the class defaults
/// (openai/clip-vit-large-patch14's values) for keys the file leaves out.
/// </summary>
public sealed record ClipImageProcessorConfig
{
    public bool DoResize { get; init; } = true;
    /// <summary><c>size.shortest_edge</c>; null when <see cref="ResizeHeight"/>/<see cref="ResizeWidth"/> are set.</summary>
    public int? ShortestEdge { get; init; } = 224;
    public int? ResizeHeight { get; init; }
    public int? ResizeWidth { get; init; }
    public PilResample Resample { get; init; } = PilResample.Bicubic;
    public bool DoCenterCrop { get; init; } = true;
    public int CropHeight { get; init; } = 224;
    public int CropWidth { get; init; } = 224;
    public bool DoRescale { get; init; } = true;
    public double RescaleFactor { get; init; } = 1.0 / 255;
    public bool DoNormalize { get; init; } = true;
    public float[] ImageMean { get; init; } = [0.48145466f, 0.4578275f, 0.40821073f];
    public float[] ImageStd { get; init; } = [0.26862954f, 0.26130258f, 0.27577711f];
    public bool DoConvertRgb { get; init; } = true;

    /// <summary>Reads preprocessor_config.json (size/crop_size may be an int or a dict, as transformers' get_size_dict accepts).</summary>
    public static ClipImageProcessorConfig Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"image processor config not found: {path}");
        var j = JsonNode.Parse(File.ReadAllText(path))?.AsObject()
                ?? throw new InvalidDataException($"{path}: empty config");
        var c = new ClipImageProcessorConfig();
        if (j["do_resize"] is { } dr) c = c with { DoResize = dr.GetValue<bool>() };
        if (j["size"] is { } size)
        {
            if (size is JsonValue v) c = c with { ShortestEdge = v.GetValue<int>(), ResizeHeight = null, ResizeWidth = null };
            else if (size["shortest_edge"] is { } se) c = c with { ShortestEdge = se.GetValue<int>(), ResizeHeight = null, ResizeWidth = null };
            else if (size["height"] is { } h && size["width"] is { } w)
                c = c with { ShortestEdge = null, ResizeHeight = h.GetValue<int>(), ResizeWidth = w.GetValue<int>() };
            else throw new InvalidDataException($"{path}: size must hold shortest_edge or height and width");
        }
        if (j["resample"] is { } rs) c = c with { Resample = (PilResample)rs.GetValue<int>() };
        if (j["do_center_crop"] is { } dcc) c = c with { DoCenterCrop = dcc.GetValue<bool>() };
        if (j["crop_size"] is { } crop)
        {
            if (crop is JsonValue v) c = c with { CropHeight = v.GetValue<int>(), CropWidth = v.GetValue<int>() };
            else c = c with { CropHeight = crop["height"]!.GetValue<int>(), CropWidth = crop["width"]!.GetValue<int>() };
        }
        if (j["do_rescale"] is { } drs) c = c with { DoRescale = drs.GetValue<bool>() };
        if (j["rescale_factor"] is { } rf) c = c with { RescaleFactor = rf.GetValue<double>() };
        if (j["do_normalize"] is { } dn) c = c with { DoNormalize = dn.GetValue<bool>() };
        if (j["image_mean"] is JsonArray mean) c = c with { ImageMean = mean.Select(x => (float)x!.GetValue<double>()).ToArray() };
        if (j["image_std"] is JsonArray std) c = c with { ImageStd = std.Select(x => (float)x!.GetValue<double>()).ToArray() };
        if (j["do_convert_rgb"] is { } rgb && rgb.GetValueKind() != System.Text.Json.JsonValueKind.Null)
            c = c with { DoConvertRgb = rgb.GetValue<bool>() };
        return c;
    }
}

/// <summary>
/// transformers' CLIPImageProcessor (<c>models/clip/image_processing_clip.py</c> with
/// <c>image_transforms.py</c>): resize with PIL on the uint8 image (shortest edge, the long edge
/// from <c>get_resize_output_image_size</c>: <c>int(size * long / short)</c>), center crop (offset
/// floored, zero-padded if the image is smaller), rescale in float64 then cast to float32,
/// normalise in float32, channels first.
/// </summary>
public sealed class ClipImageProcessor
{
    public ClipImageProcessorConfig Config { get; }

    public ClipImageProcessor(ClipImageProcessorConfig config)
    {
        if (config.DoNormalize && (config.ImageMean.Length != 3 || config.ImageStd.Length != 3))
            throw new ArgumentException($"image_mean and image_std must have 3 values for RGB, got {config.ImageMean.Length} and {config.ImageStd.Length}");
        Config = config;
    }

    /// <summary>Loads <c>preprocessor_config.json</c> from a model or processor folder.</summary>
    public static ClipImageProcessor FromPretrained(string folder) =>
        new(ClipImageProcessorConfig.Read(Path.Combine(folder, "preprocessor_config.json")));

    /// <summary>Output (height, width) of the resize step for an input of the given size.</summary>
    public (int Height, int Width) ResizeOutputSize(int height, int width)
    {
        if (Config.ShortestEdge is not int size) return (Config.ResizeHeight!.Value, Config.ResizeWidth!.Value);
        // get_resize_output_image_size(default_to_square=False): `int(size * long / short)` truncates.
        int shortSide = Math.Min(width, height), longSide = Math.Max(width, height);
        int newLong = (int)((double)((long)size * longSide) / shortSide);
        return width <= height ? (newLong, size) : (size, newLong);
    }

    /// <summary>One uint8 [H, W, 3] image → float32 [1, 3, h, w].</summary>
    public Tensor Preprocess(Tensor imageHwc)
    {
        if (imageHwc.dtype != ScalarType.Byte || imageHwc.dim() != 3 || imageHwc.shape[2] != 3)
            throw new ArgumentException($"expected an RGB uint8 image [H, W, 3], got {imageHwc.dtype} [{string.Join(",", imageHwc.shape)}]");
        var rgb = imageHwc.cpu().contiguous().data<byte>().ToArray();
        var (pixels, h, w) = PreprocessBytes(rgb, (int)imageHwc.shape[1], (int)imageHwc.shape[0]);
        return torch.tensor(pixels, new long[] { 1, 3, h, w }, ScalarType.Float32);
    }

    /// <summary>Encoded image bytes (PNG/JPEG/WebP) → float32 [1, 3, h, w].</summary>
    public Tensor Preprocess(ReadOnlySpan<byte> encoded, ImageDecodeOptions? options = null)
    {
        var (rgb, width, height) = ImageCodec.DecodeRgbBytes(encoded, options);
        var (pixels, h, w) = PreprocessBytes(rgb, width, height);
        return torch.tensor(pixels, new long[] { 1, 3, h, w }, ScalarType.Float32);
    }

    /// <summary>A batch of uint8 [H, W, 3] images → float32 [N, 3, h, w] (all outputs must share a size, as with a crop).</summary>
    public Tensor Preprocess(IReadOnlyList<Tensor> images)
    {
        using var scope = NewDisposeScope();
        return torch.cat(images.Select(Preprocess).ToArray(), 0).MoveToOuterDisposeScope();
    }

    /// <summary>Interleaved RGB bytes → channels-first float32 values and their (height, width).</summary>
    public (float[] Chw, int Height, int Width) PreprocessBytes(byte[] rgb, int width, int height)
    {
        byte[] px = rgb;
        int w = width, h = height;
        if (Config.DoResize)
        {
            var (oh, ow) = ResizeOutputSize(h, w);
            px = PillowResample.Resize(px, w, h, 3, ow, oh, Config.Resample);
            (h, w) = (oh, ow);
        }
        if (Config.DoCenterCrop) (px, h, w) = CenterCrop(px, h, w, Config.CropHeight, Config.CropWidth);

        var outp = new float[3L * h * w];
        long plane = (long)h * w;
        for (long p = 0; p < plane; p++)
        {
            for (int c = 0; c < 3; c++)
            {
                byte b = px[p * 3 + c];
                // rescale: image.astype(float64) * scale, then astype(float32); normalize runs in float32.
                float x = Config.DoRescale ? (float)(b * Config.RescaleFactor) : b;
                if (Config.DoNormalize) x = (x - Config.ImageMean[c]) / Config.ImageStd[c];
                outp[c * plane + p] = x;
            }
        }
        return (outp, h, w);
    }

    /// <summary>image_transforms.center_crop on HWC bytes, including its zero padding of small images.</summary>
    private static (byte[] Px, int H, int W) CenterCrop(byte[] px, int h, int w, int cropH, int cropW)
    {
        int top = FloorDiv(h - cropH, 2), left = FloorDiv(w - cropW, 2);
        int padTop = 0, padLeft = 0;
        if (!(top >= 0 && top + cropH <= h && left >= 0 && left + cropW <= w))
        {
            int newH = Math.Max(cropH, h), newW = Math.Max(cropW, w);
            padTop = (newH - h + 1) / 2;
            padLeft = (newW - w + 1) / 2;
            top += padTop;
            left += padLeft;
        }
        var outp = new byte[(long)cropH * cropW * 3];
        for (int y = 0; y < cropH; y++)
        {
            int sy = y + top - padTop;
            if (sy < 0 || sy >= h) continue;
            for (int x = 0; x < cropW; x++)
            {
                int sx = x + left - padLeft;
                if (sx < 0 || sx >= w) continue;
                long si = ((long)sy * w + sx) * 3, di = ((long)y * cropW + x) * 3;
                outp[di] = px[si];
                outp[di + 1] = px[si + 1];
                outp[di + 2] = px[si + 2];
            }
        }
        return (outp, cropH, cropW);
    }

    private static int FloorDiv(int a, int b) => (int)Math.Floor((double)a / b);
}
