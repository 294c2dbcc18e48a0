using RealAlign.Core.IO;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models.OpenClip;

/// <summary>
/// open_clip's <c>CLIP</c> (mlfoundations/open_clip v2.16.0 <c>model.py</c>) with a ViT image tower
/// and the built-in text transformer, fields named like the upstream state dict
/// (<c>visual.*</c>, <c>transformer.resblocks.N.*</c>, <c>token_embedding.weight</c>,
/// <c>positional_embedding</c>, <c>ln_final.*</c>, <c>text_projection</c>, <c>logit_scale</c>).
/// This is the model HPSv2 scores with (ViT-H-14 + HPS_v2(.1)_compressed weights).
/// </summary>
public sealed class OpenClipModel : nn.Module<Tensor, Tensor, (Tensor ImageFeatures, Tensor TextFeatures, Tensor LogitScale)>
{
    public VisionTransformer visual;
    public Transformer transformer;
    public Embedding token_embedding;
    public Parameter positional_embedding;
    public LayerNorm ln_final;
    public Parameter text_projection;
    public Parameter logit_scale;

    public OpenClipConfig Config { get; }

    public OpenClipModel(OpenClipConfig config) : base("CLIP")
    {
        Config = config;
        var t = config.Text;
        visual = new VisionTransformer(config.Vision, config.EmbedDim, config.QuickGelu);
        transformer = new Transformer(t.Width, t.Layers, t.Heads, t.MlpRatio, t.LsInitValue, config.QuickGelu);
        token_embedding = nn.Embedding(t.VocabSize, t.Width);
        positional_embedding = new Parameter(torch.randn(t.ContextLength, t.Width) * 0.01);
        ln_final = nn.LayerNorm(t.Width);
        text_projection = new Parameter(torch.randn(t.Width, config.EmbedDim) * Math.Pow(t.Width, -0.5));
        logit_scale = new Parameter(torch.tensor((float)Math.Log(1 / 0.07)));
        RegisterComponents();
    }

    /// <summary>
    /// Loads an open_clip hub folder: <c>open_clip_config.json</c> + <c>open_clip_model.safetensors</c>
    /// (strict: every key must match by name and shape). Returns the model in eval mode.
    /// </summary>
    public static OpenClipModel FromPretrained(string folder, Device? device = null, ScalarType dtype = ScalarType.Float32)
    {
        var config = OpenClipConfig.Read(Path.Combine(folder, "open_clip_config.json"));
        var weights = Path.Combine(folder, "open_clip_model.safetensors");
        if (!File.Exists(weights)) throw new FileNotFoundException($"open_clip weights not found: {weights}");
        var model = new OpenClipModel(config);
        using (var ck = SafeTensorsCheckpoint.Open(weights))
            ModelLoading.LoadStateDict(model, ck, strict: true);
        if (dtype != ScalarType.Float32) model.to(dtype);
        if (device is not null) model.to(device);
        model.eval();
        LinearHooks.AssignPaths(model);
        return model;
    }

    /// <summary>Image features [N, embed_dim] from normalised pixels [N, 3, H, W] (<c>encode_image</c>).</summary>
    public Tensor encode_image(Tensor image, bool normalize = false)
    {
        using var scope = NewDisposeScope();
        var features = visual.forward(image);
        if (normalize) features = nn.functional.normalize(features, dim: -1);
        return features.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Text features [N, embed_dim] from open_clip token ids [N, context_length] (<c>encode_text</c>):
    /// causal transformer, <c>ln_final</c>, the token at argmax(ids) (eot has the largest id), <c>@ text_projection</c>.
    /// </summary>
    public Tensor encode_text(Tensor text, bool normalize = false)
    {
        using var scope = NewDisposeScope();
        int ctx = Config.Text.ContextLength;
        if (text.dim() != 2 || text.shape[1] != ctx)
            throw new ArgumentException($"open_clip text tower expects token ids [N, {ctx}], got [{string.Join(",", text.shape)}]");
        var dtype = positional_embedding.dtype;
        var x = token_embedding.forward(text).to(dtype);
        x = x + positional_embedding;
        // build_attention_mask: additive causal mask, −inf above the diagonal.
        var mask = torch.full(ctx, ctx, float.NegativeInfinity, dtype: dtype, device: x.device).triu(1);
        x = transformer.forward(x, mask);
        x = ln_final.forward(x);
        var eot = text.argmax(-1);
        x = x[torch.arange(x.shape[0], device: x.device), eot];
        x = torch.matmul(x, text_projection);
        if (normalize) x = nn.functional.normalize(x, dim: -1);
        return x.MoveToOuterDisposeScope();
    }

    /// <summary>Upstream <c>forward</c>: normalised image and text features and <c>logit_scale.exp()</c>.</summary>
    public override (Tensor ImageFeatures, Tensor TextFeatures, Tensor LogitScale) forward(Tensor image, Tensor text) =>
        (encode_image(image, normalize: true), encode_text(text, normalize: true), logit_scale.exp());
}
