using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models.Clip;

/// <summary>
/// transformers <c>CLIPTextTransformer</c>: embeddings → encoder (causal mask, plus the padding mask
/// when given) → final_layer_norm; pooled = the eos position's final state.
/// </summary>
public sealed class CLIPTextTransformer : nn.Module<Tensor, Tensor?, BaseModelOutputWithPooling>
{
    public CLIPTextEmbeddings embeddings;
    public CLIPEncoder encoder;
    public LayerNorm final_layer_norm;

    private readonly int _eosTokenId;

    public CLIPTextConfig Config { get; }

    public CLIPTextTransformer(CLIPTextConfig config) : base(nameof(CLIPTextTransformer))
    {
        Config = config;
        _eosTokenId = config.EosTokenId ?? 49407;
        embeddings = new CLIPTextEmbeddings(config);
        encoder = new CLIPEncoder(config);
        final_layer_norm = nn.LayerNorm(config.HiddenSize, config.LayerNormEps);
        RegisterComponents();
    }

    /// <param name="input_ids">[B, S] int64 (moved to the model's device if needed)</param>
    /// <param name="attention_mask">[B, S] 1 = token, 0 = padding, or null (SD3 passes none)</param>
    public override BaseModelOutputWithPooling forward(Tensor input_ids, Tensor? attention_mask)
    {
        using var scope = NewDisposeScope();
        var device = embeddings.token_embedding.weight!.device;
        var ids = input_ids.view(-1, input_ids.shape[^1]).to(device);
        var hidden_states = embeddings.forward(ids);
        var mask = BuildAttentionMask(ids.shape[0], ids.shape[1], attention_mask?.view(-1, ids.shape[1]).to(device),
            hidden_states.dtype, device);

        var all_hidden_states = encoder.forward(hidden_states, mask);
        var last_hidden_state = final_layer_norm.forward(all_hidden_states[^1]);

        // Legacy configs (eos_token_id == 2, e.g. openai CLIP-L) pool at argmax(input_ids), i.e. the first
        // <|endoftext|> since it has the largest id; newer ones at the first eos_token_id.
        var eos_index = _eosTokenId == 2
            ? ids.to(ScalarType.Int32).argmax(-1)
            : ids.to(ScalarType.Int32).eq(_eosTokenId).to(ScalarType.Int32).argmax(-1);
        var batch_index = arange(ids.shape[0], dtype: ScalarType.Int64, device: device);
        var pooled_output = last_hidden_state[TensorIndex.Tensor(batch_index), TensorIndex.Tensor(eos_index)];

        return new BaseModelOutputWithPooling(last_hidden_state, pooled_output, all_hidden_states).MoveToOuter();
    }

    public BaseModelOutputWithPooling forward(Tensor input_ids) => forward(input_ids, null);

    /// <summary>
    /// The additive mask upstream builds with <c>_create_4d_causal_attention_mask</c> (finfo.min above the
    /// diagonal) plus <c>_prepare_4d_attention_mask</c> (finfo.min at padded keys), [B|1, 1, S, S].
    /// </summary>
    private static Tensor BuildAttentionMask(long batch, long seq, Tensor? attention_mask, ScalarType dtype, Device device)
    {
        double min = torch.finfo(dtype).min;
        var causal = full(seq, seq, min, dtype: dtype, device: device).triu(1).view(1, 1, seq, seq);
        if (attention_mask is null) return causal;
        var keep = attention_mask.to(dtype).view(batch, 1, 1, seq).expand(batch, 1, seq, seq);
        var inverted = 1.0 - keep;
        var padding = inverted.masked_fill(inverted.to(ScalarType.Bool), min);
        return causal + padding;
    }
}

/// <summary>transformers <c>CLIPTextModel</c> (no projection; e.g. the SD1.5 text encoder).</summary>
public sealed class CLIPTextModel : nn.Module<Tensor, Tensor?, BaseModelOutputWithPooling>
{
    public CLIPTextTransformer text_model;

    public CLIPTextModel(CLIPTextConfig config) : base(nameof(CLIPTextModel))
    {
        text_model = new CLIPTextTransformer(config);
        RegisterComponents();
    }

    public override BaseModelOutputWithPooling forward(Tensor input_ids, Tensor? attention_mask) => text_model.forward(input_ids, attention_mask);
    public BaseModelOutputWithPooling forward(Tensor input_ids) => text_model.forward(input_ids, null);

    /// <summary>Loads config.json + model.safetensors; a CLIPTextModelWithProjection or CLIPModel checkpoint loads its text tower.</summary>
    public static CLIPTextModel FromPretrained(string folder, Device? device = null, ScalarType dtype = ScalarType.Float32, string prefix = "")
    {
        var model = new CLIPTextModel(CLIPTextConfig.FromFile(Path.Combine(folder, "config.json")));
        return ClipLoading.Load(model, folder, device, dtype, prefix, k => ClipLoading.IsVisionKey(k) || k.StartsWith("text_projection.", StringComparison.Ordinal));
    }
}

/// <summary>
/// transformers <c>CLIPTextModelWithProjection</c> (SD3's text_encoder / text_encoder_2):
/// text_embeds = text_projection(pooled), no bias.
/// </summary>
public sealed class CLIPTextModelWithProjection : nn.Module<Tensor, Tensor?, CLIPTextModelOutput>
{
    public CLIPTextTransformer text_model;
    public LoRACompatibleLinear text_projection;

    public CLIPTextConfig Config { get; }

    public CLIPTextModelWithProjection(CLIPTextConfig config) : base(nameof(CLIPTextModelWithProjection))
    {
        Config = config;
        text_model = new CLIPTextTransformer(config);
        text_projection = new LoRACompatibleLinear(config.HiddenSize, config.ProjectionDimOrDefault, hasBias: false);
        RegisterComponents();
    }

    public override CLIPTextModelOutput forward(Tensor input_ids, Tensor? attention_mask)
    {
        using var scope = NewDisposeScope();
        var o = text_model.forward(input_ids, attention_mask);
        var text_embeds = text_projection.forward(o.PoolerOutput);
        ClipOutputScopes.MoveToOuter([text_embeds, o.LastHiddenState, .. o.HiddenStates]);
        return new CLIPTextModelOutput(text_embeds, o.LastHiddenState, o.HiddenStates);
    }

    public CLIPTextModelOutput forward(Tensor input_ids) => forward(input_ids, null);

    /// <summary>Loads config.json + model.safetensors (strict); a CLIPModel folder loads its text tower.</summary>
    public static CLIPTextModelWithProjection FromPretrained(string folder, Device? device = null, ScalarType dtype = ScalarType.Float32, string prefix = "")
    {
        var model = new CLIPTextModelWithProjection(CLIPTextConfig.FromFile(Path.Combine(folder, "config.json")));
        return ClipLoading.Load(model, folder, device, dtype, prefix, ClipLoading.IsVisionKey);
    }
}

internal static class ClipLoading
{
    /// <summary>Keys of the other tower in a CLIPModel checkpoint (transformers leaves them as "unused weights").</summary>
    public static bool IsVisionKey(string k) =>
        k.StartsWith("vision_model.", StringComparison.Ordinal) || k.StartsWith("visual_projection.", StringComparison.Ordinal) || k == "logit_scale";

    public static bool IsTextKey(string k) =>
        k.StartsWith("text_model.", StringComparison.Ordinal) || k.StartsWith("text_projection.", StringComparison.Ordinal) || k == "logit_scale";

    /// <summary>
    /// Converts, moves, then copies the checkpoint in strictly: every model tensor must be present with
    /// its shape, and the only tolerated extras are <paramref name="ignore"/>d keys and the
    /// <c>position_ids</c> buffers older transformers saved (non-persistent since).
    /// </summary>
    public static T Load<T>(T model, string folder, Device? device, ScalarType dtype, string prefix, Func<string, bool>? ignore)
        where T : nn.Module
    {
        model.to(dtype);
        if (device is not null) model.to(device);
        using (var ck = IO.SafeTensorsCheckpoint.OpenFolder(folder, "model"))
        {
            IO.ModelLoading.LoadStateDict(model, ck, strict: true, prefix: prefix, ignoreUnexpected: k =>
            {
                var name = k[prefix.Length..];
                return name.EndsWith("embeddings.position_ids", StringComparison.Ordinal) || (ignore?.Invoke(name) ?? false);
            });
        }
        model.eval();
        LinearHooks.AssignPaths(model);
        return model;
    }
}
