using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models.Clip;

/// <summary>
/// transformers <c>CLIPVisionTransformer</c>: embeddings → pre_layrnorm (upstream's spelling, it is the
/// checkpoint key) → encoder; pooled = post_layernorm(CLS). last_hidden_state is before post_layernorm.
/// </summary>
public sealed class CLIPVisionTransformer : nn.Module<Tensor, BaseModelOutputWithPooling>
{
    public CLIPVisionEmbeddings embeddings;
    public LayerNorm pre_layrnorm;
    public CLIPEncoder encoder;
    public LayerNorm post_layernorm;

    public CLIPVisionConfig Config { get; }

    public CLIPVisionTransformer(CLIPVisionConfig config) : base(nameof(CLIPVisionTransformer))
    {
        Config = config;
        embeddings = new CLIPVisionEmbeddings(config);
        pre_layrnorm = nn.LayerNorm(config.HiddenSize, config.LayerNormEps);
        encoder = new CLIPEncoder(config);
        post_layernorm = nn.LayerNorm(config.HiddenSize, config.LayerNormEps);
        RegisterComponents();
    }

    /// <param name="pixel_values">[B, C, image_size, image_size], CLIP-normalised (moved to the model's device if needed)</param>
    public override BaseModelOutputWithPooling forward(Tensor pixel_values)
    {
        using var scope = NewDisposeScope();
        var hidden_states = embeddings.forward(pixel_values.to(post_layernorm.weight!.device));
        hidden_states = pre_layrnorm.forward(hidden_states);
        var all_hidden_states = encoder.forward(hidden_states, null);
        var last_hidden_state = all_hidden_states[^1];
        var pooled_output = post_layernorm.forward(last_hidden_state[TensorIndex.Colon, 0, TensorIndex.Colon]);
        return new BaseModelOutputWithPooling(last_hidden_state, pooled_output, all_hidden_states).MoveToOuter();
    }
}

/// <summary>transformers <c>CLIPVisionModelWithProjection</c>: image_embeds = visual_projection(pooled), no bias.</summary>
public sealed class CLIPVisionModelWithProjection : nn.Module<Tensor, CLIPVisionModelOutput>
{
    public CLIPVisionTransformer vision_model;
    public LoRACompatibleLinear visual_projection;

    public CLIPVisionConfig Config { get; }

    public CLIPVisionModelWithProjection(CLIPVisionConfig config) : base(nameof(CLIPVisionModelWithProjection))
    {
        Config = config;
        vision_model = new CLIPVisionTransformer(config);
        visual_projection = new LoRACompatibleLinear(config.HiddenSize, config.ProjectionDimOrDefault, hasBias: false);
        RegisterComponents();
    }

    public override CLIPVisionModelOutput forward(Tensor pixel_values)
    {
        using var scope = NewDisposeScope();
        var o = vision_model.forward(pixel_values);
        var image_embeds = visual_projection.forward(o.PoolerOutput);
        ClipOutputScopes.MoveToOuter([image_embeds, o.LastHiddenState, .. o.HiddenStates]);
        return new CLIPVisionModelOutput(image_embeds, o.LastHiddenState, o.HiddenStates);
    }

    /// <summary>Loads config.json + model.safetensors (strict); a CLIPModel folder loads its vision tower.</summary>
    public static CLIPVisionModelWithProjection FromPretrained(string folder, Device? device = null, ScalarType dtype = ScalarType.Float32, string prefix = "")
    {
        var model = new CLIPVisionModelWithProjection(CLIPVisionConfig.FromFile(Path.Combine(folder, "config.json")));
        return ClipLoading.Load(model, folder, device, dtype, prefix, ClipLoading.IsTextKey);
    }
}
