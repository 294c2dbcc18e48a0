using System.Text.Json.Nodes;

namespace RealAlign.Core.Models.OpenClip;

/// <summary>open_clip <c>CLIPVisionCfg</c> (model.py, v2.16.0) — the ViT fields this port implements.</summary>
public sealed record OpenClipVisionConfig
{
    public int Layers { get; init; } = 12;
    public int Width { get; init; } = 768;
    public int HeadWidth { get; init; } = 64;
    public double MlpRatio { get; init; } = 4.0;
    public int PatchSize { get; init; } = 16;
    public int ImageHeight { get; init; } = 224;
    public int ImageWidth { get; init; } = 224;
    /// <summary>Layer scale init value; when set the blocks carry <c>ls_1.gamma</c>/<c>ls_2.gamma</c>.</summary>
    public double? LsInitValue { get; init; }
    public bool GlobalAveragePool { get; init; }

    public int Heads => Width / HeadWidth;
}

/// <summary>open_clip <c>CLIPTextCfg</c> — the built-in text transformer (no HF text tower).</summary>
public sealed record OpenClipTextConfig
{
    public int ContextLength { get; init; } = 77;
    public int VocabSize { get; init; } = 49408;
    public int Width { get; init; } = 512;
    public int Heads { get; init; } = 8;
    public int Layers { get; init; } = 12;
    /// <summary>open_clip 2.16's text Transformer always uses 4.0; later versions read it from text_cfg.</summary>
    public double MlpRatio { get; init; } = 4.0;
    public double? LsInitValue { get; init; }
}

/// <summary>
/// The <c>model_cfg</c> of an open_clip hub folder's <c>open_clip_config.json</c> (what
/// <c>push_to_hf_hub.save_config_for_hf</c> writes) or of a bare model-config JSON
/// (<c>model_configs/ViT-H-14.json</c>), plus <c>preprocess_cfg</c> mean/std when present.
/// </summary>
public sealed record OpenClipConfig
{
    public int EmbedDim { get; init; } = 512;
    public bool QuickGelu { get; init; }
    public OpenClipVisionConfig Vision { get; init; } = new();
    public OpenClipTextConfig Text { get; init; } = new();
    public float[]? PreprocessMean { get; init; }
    public float[]? PreprocessStd { get; init; }

    public static OpenClipConfig Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"open_clip config not found: {path}");
        var root = JsonNode.Parse(File.ReadAllText(path))?.AsObject() ?? throw new InvalidDataException($"{path}: empty config");
        var m = root["model_cfg"]?.AsObject() ?? root;
        var v = m["vision_cfg"]?.AsObject() ?? new JsonObject();
        var t = m["text_cfg"]?.AsObject() ?? new JsonObject();

        void Refuse(JsonObject o, string section, params string[] keys)
        {
            foreach (var k in keys)
            {
                var n = o[k];
                if (n is null || n.GetValueKind() is System.Text.Json.JsonValueKind.Null or System.Text.Json.JsonValueKind.False) continue;
                if (n.GetValueKind() == System.Text.Json.JsonValueKind.String && n.GetValue<string>().Length == 0) continue;
                throw new NotSupportedException($"{path}: {section}.{k} = {n.ToJsonString()} is not supported by this open_clip port (ViT image tower + built-in text transformer only)");
            }
        }
        Refuse(m, "model_cfg", "custom_text");
        Refuse(v, "vision_cfg", "timm_model_name", "input_patchnorm", "attentional_pool");
        Refuse(t, "text_cfg", "hf_model_name", "embed_cls");
        if (v["layers"] is JsonArray)
            throw new NotSupportedException($"{path}: vision_cfg.layers is a list (ModifiedResNet image tower), which this port does not implement");

        int imageH = 224, imageW = 224;
        if (v["image_size"] is JsonArray sz) { imageH = sz[0]!.GetValue<int>(); imageW = sz[1]!.GetValue<int>(); }
        else if (v["image_size"] is { } s) imageH = imageW = s.GetValue<int>();

        var d = new OpenClipVisionConfig();
        var vision = new OpenClipVisionConfig
        {
            Layers = Int(v, "layers", d.Layers),
            Width = Int(v, "width", d.Width),
            HeadWidth = Int(v, "head_width", d.HeadWidth),
            MlpRatio = Dbl(v, "mlp_ratio", d.MlpRatio),
            PatchSize = Int(v, "patch_size", d.PatchSize),
            ImageHeight = imageH,
            ImageWidth = imageW,
            LsInitValue = NullableDbl(v, "ls_init_value"),
            GlobalAveragePool = v["global_average_pool"]?.GetValue<bool>() ?? false,
        };
        var dt = new OpenClipTextConfig();
        var text = new OpenClipTextConfig
        {
            ContextLength = Int(t, "context_length", dt.ContextLength),
            VocabSize = Int(t, "vocab_size", dt.VocabSize),
            Width = Int(t, "width", dt.Width),
            Heads = Int(t, "heads", dt.Heads),
            Layers = Int(t, "layers", dt.Layers),
            MlpRatio = Dbl(t, "mlp_ratio", dt.MlpRatio),
            LsInitValue = NullableDbl(t, "ls_init_value"),
        };
        if (vision.Width % vision.HeadWidth != 0)
            throw new InvalidDataException($"{path}: vision width {vision.Width} is not a multiple of head_width {vision.HeadWidth}");
        if (text.Width % text.Heads != 0)
            throw new InvalidDataException($"{path}: text width {text.Width} is not a multiple of heads {text.Heads}");

        float[]? Floats(JsonNode? n) => n is JsonArray arr ? arr.Select(x => (float)x!.GetValue<double>()).ToArray() : null;
        return new OpenClipConfig
        {
            EmbedDim = Int(m, "embed_dim", 512),
            QuickGelu = m["quick_gelu"]?.GetValue<bool>() ?? false,
            Vision = vision,
            Text = text,
            PreprocessMean = Floats(root["preprocess_cfg"]?["mean"]),
            PreprocessStd = Floats(root["preprocess_cfg"]?["std"]),
        };
    }

    private static int Int(JsonObject o, string key, int fallback) => o[key] is { } n ? n.GetValue<int>() : fallback;
    private static double Dbl(JsonObject o, string key, double fallback) => o[key] is { } n ? n.GetValue<double>() : fallback;
    private static double? NullableDbl(JsonObject o, string key) =>
        o[key] is { } n && n.GetValueKind() != System.Text.Json.JsonValueKind.Null ? n.GetValue<double>() : null;
}
