using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models.Clip;

/// <summary>
/// transformers <c>CLIPModel</c>: both towers, their bias-free projections and the learned
/// temperature <c>logit_scale</c> (stored as a log; logits use its exp). PickScore_v1 is this class.
/// </summary>
public sealed class CLIPModel : nn.Module<Tensor, Tensor, Tensor?, CLIPOutput>
{
    public CLIPTextTransformer text_model;
    public CLIPVisionTransformer vision_model;
    public LoRACompatibleLinear visual_projection;
    public LoRACompatibleLinear text_projection;
    public Parameter logit_scale;

    public CLIPConfig Config { get; }

    public CLIPModel(CLIPConfig config) : base(nameof(CLIPModel))
    {
        Config = config;
        text_model = new CLIPTextTransformer(config.TextConfig);
        vision_model = new CLIPVisionTransformer(config.VisionConfig);
        visual_projection = new LoRACompatibleLinear(config.VisionConfig.HiddenSize, config.ProjectionDim, hasBias: false);
        text_projection = new LoRACompatibleLinear(config.TextConfig.HiddenSize, config.ProjectionDim, hasBias: false);
        logit_scale = new Parameter(tensor((float)config.LogitScaleInitValue));
        RegisterComponents();
    }

    /// <summary><c>get_text_features</c>: unnormalised text_projection(pooled), [B, projection_dim].</summary>
    public Tensor GetTextFeatures(Tensor input_ids, Tensor? attention_mask = null)
    {
        using var scope = NewDisposeScope();
        var o = text_model.forward(input_ids, attention_mask);
        return text_projection.forward(o.PoolerOutput).MoveToOuterDisposeScope();
    }

    /// <summary><c>get_image_features</c>: unnormalised visual_projection(post_layernorm(CLS)), [B, projection_dim].</summary>
    public Tensor GetImageFeatures(Tensor pixel_values)
    {
        using var scope = NewDisposeScope();
        var o = vision_model.forward(pixel_values);
        return visual_projection.forward(o.PoolerOutput).MoveToOuterDisposeScope();
    }

    /// <summary>Image–text logits: logits_per_text = exp(logit_scale) · norm(text) · norm(image)ᵀ; logits_per_image its transpose.</summary>
    public override CLIPOutput forward(Tensor input_ids, Tensor pixel_values, Tensor? attention_mask)
    {
        using var scope = NewDisposeScope();
        var vision_outputs = vision_model.forward(pixel_values);
        var text_outputs = text_model.forward(input_ids, attention_mask);

        var image_embeds = visual_projection.forward(vision_outputs.PoolerOutput);
        var text_embeds = text_projection.forward(text_outputs.PoolerOutput);
        // _get_vector_norm: sqrt(sum(x²)) over the last dim
        image_embeds = image_embeds / image_embeds.pow(2).sum(-1, keepdim: true).pow(0.5);
        text_embeds = text_embeds / text_embeds.pow(2).sum(-1, keepdim: true).pow(0.5);

        var logits_per_text = matmul(text_embeds, image_embeds.t().to(text_embeds.device)) * logit_scale.exp().to(text_embeds.device);
        var logits_per_image = logits_per_text.t();

        ClipOutputScopes.MoveToOuter([logits_per_image, logits_per_text, text_embeds, image_embeds, .. vision_outputs.All(), .. text_outputs.All()]);
        return new CLIPOutput(logits_per_image, logits_per_text, text_embeds, image_embeds, text_outputs, vision_outputs);
    }

    public CLIPOutput forward(Tensor input_ids, Tensor pixel_values) => forward(input_ids, pixel_values, null);

    /// <summary>Loads a CLIPModel folder (config.json with text_config/vision_config + model.safetensors), strict.</summary>
    public static CLIPModel FromPretrained(string folder, Device? device = null, ScalarType dtype = ScalarType.Float32, string prefix = "")
    {
        var model = new CLIPModel(CLIPConfig.FromFile(Path.Combine(folder, "config.json")));
        return ClipLoading.Load(model, folder, device, dtype, prefix, null);
    }
}
