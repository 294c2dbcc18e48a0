using System.Text.Json.Serialization;
using RealAlign.Core.IO;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models.Transformers;

/// <summary>
/// <c>config.json</c> of diffusers <c>SD3Transformer2DModel</c>; defaults are the class defaults of
/// diffusers 0.32.2 (SD3-Medium-like), not those of any released checkpoint.
/// </summary>
public sealed record SD3Transformer2DModelConfig
{
    [JsonPropertyName("sample_size")] public long SampleSize { get; init; } = 128;
    [JsonPropertyName("patch_size")] public long PatchSize { get; init; } = 2;
    [JsonPropertyName("in_channels")] public long InChannels { get; init; } = 16;
    [JsonPropertyName("num_layers")] public int NumLayers { get; init; } = 18;
    [JsonPropertyName("attention_head_dim")] public long AttentionHeadDim { get; init; } = 64;
    [JsonPropertyName("num_attention_heads")] public long NumAttentionHeads { get; init; } = 18;
    [JsonPropertyName("joint_attention_dim")] public long JointAttentionDim { get; init; } = 4096;
    [JsonPropertyName("caption_projection_dim")] public long CaptionProjectionDim { get; init; } = 1152;
    [JsonPropertyName("pooled_projection_dim")] public long PooledProjectionDim { get; init; } = 2048;
    /// <summary>null means <see cref="InChannels"/>, as upstream.</summary>
    [JsonPropertyName("out_channels")] public long? OutChannels { get; init; } = 16;
    /// <summary>Side of the stored position table in patches; null gives an uncropped table of sample_size / patch_size.</summary>
    [JsonPropertyName("pos_embed_max_size")] public long? PosEmbedMaxSize { get; init; } = 96;
    /// <summary>Blocks with the extra image-only attention (SD3.5-Medium: 0..12; SD3.0 and SD3.5-Large: none).</summary>
    [JsonPropertyName("dual_attention_layers")] public int[] DualAttentionLayers { get; init; } = [];
    /// <summary>null (SD3.0) or "rms_norm" (SD3.5).</summary>
    [JsonPropertyName("qk_norm")] public string? QkNorm { get; init; }

    public long InnerDim => NumAttentionHeads * AttentionHeadDim;

    public static SD3Transformer2DModelConfig Load(string path) => ModelLoading.ReadConfig<SD3Transformer2DModelConfig>(path);
}

/// <summary>
/// diffusers <c>JointTransformerBlock</c> (models/attention.py): the MMDiT block (SD3, arXiv:2403.03206)
/// with separate adaLN-Zero modulation, MLPs and projections for the image and context streams and one
/// joint attention. <c>use_dual_attention</c> adds the SD3.5 (MMDiT-X) image-only <c>attn2</c>;
/// <c>context_pre_only</c> (the last block) drops the context stream's output path.
/// </summary>
public sealed class JointTransformerBlock : nn.Module<Tensor, Tensor, Tensor, (Tensor? encoder_hidden_states, Tensor hidden_states)>
{
    /// <summary><see cref="AdaLayerNormZero"/> or, with dual attention, <see cref="SD35AdaLayerNormZeroX"/>.</summary>
    public nn.Module norm1;
    /// <summary><see cref="AdaLayerNormZero"/> or, when <c>context_pre_only</c>, <see cref="AdaLayerNormContinuous"/>.</summary>
    public nn.Module norm1_context;
    public Attention attn;
    public Attention? attn2;
    public LayerNorm norm2;
    public FeedForward ff;
    public LayerNorm? norm2_context;
    public FeedForward? ff_context;

    public bool use_dual_attention { get; }
    public bool context_pre_only { get; }

    public JointTransformerBlock(long dim, long num_attention_heads, long attention_head_dim, bool context_pre_only = false,
        string? qk_norm = null, bool use_dual_attention = false) : base(nameof(JointTransformerBlock))
    {
        this.use_dual_attention = use_dual_attention;
        this.context_pre_only = context_pre_only;

        norm1 = use_dual_attention ? new SD35AdaLayerNormZeroX(dim) : new AdaLayerNormZero(dim);
        norm1_context = context_pre_only
            ? new AdaLayerNormContinuous(dim, dim, elementwise_affine: false, eps: 1e-6, bias: true, norm_type: "layer_norm")
            : new AdaLayerNormZero(dim);

        attn = new Attention(query_dim: dim, cross_attention_dim: null, added_kv_proj_dim: dim, dim_head: attention_head_dim,
            heads: num_attention_heads, out_dim: dim, context_pre_only: context_pre_only, bias: true, qk_norm: qk_norm, eps: 1e-6);
        if (use_dual_attention)
            attn2 = new Attention(query_dim: dim, cross_attention_dim: null, dim_head: attention_head_dim, heads: num_attention_heads,
                out_dim: dim, bias: true, qk_norm: qk_norm, eps: 1e-6);

        norm2 = nn.LayerNorm(dim, eps: 1e-6, elementwise_affine: false);
        ff = new FeedForward(dim: dim, dim_out: dim, activation_fn: "gelu-approximate");
        if (!context_pre_only)
        {
            norm2_context = nn.LayerNorm(dim, eps: 1e-6, elementwise_affine: false);
            ff_context = new FeedForward(dim: dim, dim_out: dim, activation_fn: "gelu-approximate");
        }
        RegisterComponents();
    }

    /// <summary>Returns <c>(encoder_hidden_states, hidden_states)</c> in upstream's order; the first is null when <c>context_pre_only</c>.</summary>
    public override (Tensor? encoder_hidden_states, Tensor hidden_states) forward(Tensor hidden_states, Tensor encoder_hidden_states, Tensor temb)
    {
        using var scope = NewDisposeScope();
        Tensor norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp;
        Tensor? norm_hidden_states2 = null, gate_msa2 = null;
        if (norm1 is SD35AdaLayerNormZeroX normX)
            (norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2) = normX.forward(hidden_states, temb);
        else
            (norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp) = ((AdaLayerNormZero)norm1).forward(hidden_states, temb);

        Tensor norm_encoder_hidden_states;
        Tensor? c_gate_msa = null, c_shift_mlp = null, c_scale_mlp = null, c_gate_mlp = null;
        if (norm1_context is AdaLayerNormContinuous normCont)
            norm_encoder_hidden_states = normCont.forward(encoder_hidden_states, temb);
        else
            (norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) =
                ((AdaLayerNormZero)norm1_context).forward(encoder_hidden_states, temb);

        // Attention.
        var (attn_output, context_attn_output) = attn.forward(norm_hidden_states, norm_encoder_hidden_states);

        // Process attention outputs for the `hidden_states`.
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output;

        if (attn2 is not null)
        {
            var attn_output2 = attn2.forward(norm_hidden_states2!);
            hidden_states = hidden_states + gate_msa2!.unsqueeze(1) * attn_output2;
        }

        norm_hidden_states = norm2.forward(hidden_states);
        norm_hidden_states = norm_hidden_states * (scale_mlp.unsqueeze(1) + 1) + shift_mlp.unsqueeze(1);
        var ff_output = ff.forward(norm_hidden_states);
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output;

        // Process attention outputs for the `encoder_hidden_states`.
        Tensor? context_out = null;
        if (!context_pre_only)
        {
            var ctx = encoder_hidden_states + c_gate_msa!.unsqueeze(1) * context_attn_output!;
            var norm_ctx = norm2_context!.forward(ctx);
            norm_ctx = norm_ctx * (c_scale_mlp!.unsqueeze(1) + 1) + c_shift_mlp!.unsqueeze(1);
            var context_ff_output = ff_context!.forward(norm_ctx);
            context_out = ctx + c_gate_mlp!.unsqueeze(1) * context_ff_output;
        }

        return (context_out?.MoveToOuterDisposeScope(), hidden_states.MoveToOuterDisposeScope());
    }
}

/// <summary>
/// diffusers <c>SD3Transformer2DModel</c> (models/transformers/transformer_sd3.py, v0.32.2): the MMDiT of
/// Stable Diffusion 3 / 3.5. Module names equal the diffusers checkpoint keys, so a diffusers
/// <c>transformer/</c> folder loads without key mapping. Predicts the flow-matching velocity.
/// </summary>
public sealed class SD3Transformer2DModel : nn.Module<Tensor, Tensor, Tensor, Tensor, Tensor>
{
    public PatchEmbed pos_embed;
    public CombinedTimestepTextProjEmbeddings time_text_embed;
    public LoRACompatibleLinear context_embedder;
    public ModuleList<JointTransformerBlock> transformer_blocks;
    public AdaLayerNormContinuous norm_out;
    public LoRACompatibleLinear proj_out;

    public SD3Transformer2DModelConfig Config { get; }
    public long out_channels { get; }
    public long inner_dim { get; }

    /// <summary>
    /// Builds a randomly initialised model from its config. Each component is moved to
    /// <paramref name="device"/> / <paramref name="dtype"/> as soon as it is built, so at most one
    /// block exists in float32 on the CPU at a time (SD3.5-Large is ~8B parameters).
    /// </summary>
    public SD3Transformer2DModel(SD3Transformer2DModelConfig config, Device? device = null, ScalarType? dtype = null)
        : base(nameof(SD3Transformer2DModel))
    {
        Config = config;
        out_channels = config.OutChannels ?? config.InChannels;
        inner_dim = config.InnerDim;
        var dual = new HashSet<int>(config.DualAttentionLayers);
        if (config.DualAttentionLayers.Any(i => i < 0 || i >= config.NumLayers))
            throw new ArgumentException($"dual_attention_layers [{string.Join(",", config.DualAttentionLayers)}] out of range for num_layers {config.NumLayers}");

        T Place<T>(T m) where T : nn.Module
        {
            if (dtype is { } dt) m.to(dt);
            if (device is not null) m.to(device);
            return m;
        }

        pos_embed = Place(new PatchEmbed(height: config.SampleSize, width: config.SampleSize, patch_size: config.PatchSize,
            in_channels: config.InChannels, embed_dim: inner_dim, pos_embed_max_size: config.PosEmbedMaxSize));
        time_text_embed = Place(new CombinedTimestepTextProjEmbeddings(embedding_dim: inner_dim, pooled_projection_dim: config.PooledProjectionDim));
        context_embedder = Place(new LoRACompatibleLinear(config.JointAttentionDim, config.CaptionProjectionDim));

        transformer_blocks = new ModuleList<JointTransformerBlock>();
        for (int i = 0; i < config.NumLayers; i++)
            transformer_blocks.Add(Place(new JointTransformerBlock(dim: inner_dim, num_attention_heads: config.NumAttentionHeads,
                attention_head_dim: config.AttentionHeadDim, context_pre_only: i == config.NumLayers - 1,
                qk_norm: config.QkNorm, use_dual_attention: dual.Contains(i))));

        norm_out = Place(new AdaLayerNormContinuous(inner_dim, inner_dim, elementwise_affine: false, eps: 1e-6));
        proj_out = Place(new LoRACompatibleLinear(inner_dim, config.PatchSize * config.PatchSize * out_channels, hasBias: true));

        RegisterComponents();
        if (dtype is { } d) this.to(d);
        if (device is not null) this.to(device);
        LinearHooks.AssignPaths(this);
    }

    /// <summary>
    /// Loads a diffusers <c>transformer/</c> folder: <c>config.json</c> plus
    /// <c>diffusion_pytorch_model.safetensors</c> (or its sharded index), strictly (every key must match).
    /// The model is returned in eval mode.
    /// </summary>
    public static SD3Transformer2DModel FromPretrained(string folder, Device? device = null, ScalarType dtype = ScalarType.Float32)
    {
        var config = SD3Transformer2DModelConfig.Load(Path.Combine(folder, "config.json"));
        var model = new SD3Transformer2DModel(config, device, dtype);
        try
        {
            using var ck = SafeTensorsCheckpoint.OpenFolder(folder, "diffusion_pytorch_model");
            ModelLoading.LoadStateDict(model, ck, strict: true);
        }
        catch
        {
            model.Dispose();
            throw;
        }
        model.eval();
        return model;
    }

    /// <summary>
    /// Velocity prediction. <paramref name="hidden_states"/>: latents [B, C, H, W]; <paramref name="encoder_hidden_states"/>:
    /// prompt embeddings [B, L, joint_attention_dim]; <paramref name="pooled_projections"/>: [B, pooled_projection_dim];
    /// <paramref name="timestep"/>: float [B], sigma·1000. Returns [B, out_channels, H, W].
    /// </summary>
    public override Tensor forward(Tensor hidden_states, Tensor encoder_hidden_states, Tensor pooled_projections, Tensor timestep) =>
        forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, block_controlnet_hidden_states: null, skip_layers: null);

    /// <summary>
    /// Upstream's full signature: ControlNet residuals are added after every non-final block
    /// (block i takes residual <c>floor(i / (num_layers / n))</c>); <paramref name="skip_layers"/> (SD3.5
    /// skip-layer guidance) are bypassed.
    /// </summary>
    public Tensor forward(Tensor hidden_states, Tensor encoder_hidden_states, Tensor pooled_projections, Tensor timestep,
        IReadOnlyList<Tensor>? block_controlnet_hidden_states, IReadOnlyCollection<int>? skip_layers)
    {
        using var scope = NewDisposeScope();
        long height = hidden_states.shape[^2], width = hidden_states.shape[^1];
        long p = Config.PatchSize;
        if (height % p != 0 || width % p != 0)
            throw new ArgumentException($"latent size {height}x{width} is not a multiple of patch_size {p}", nameof(hidden_states));

        var h = pos_embed.forward(hidden_states); // adds the cropped position table too
        var temb = time_text_embed.forward(timestep, pooled_projections);
        Tensor? ctx = context_embedder.forward(encoder_hidden_states);

        for (int index_block = 0; index_block < transformer_blocks.Count; index_block++)
        {
            var block = transformer_blocks[index_block];
            if (skip_layers is null || !skip_layers.Contains(index_block))
            {
                var (next_ctx, next_h) = block.forward(h, ctx!, temb);
                // Each block's inputs are freed once consumed, so activations do not pile up over the
                // blocks (autograd keeps its own references to what backward needs).
                h.Dispose();
                ctx?.Dispose();
                (ctx, h) = (next_ctx, next_h);
            }
            if (block_controlnet_hidden_states is { Count: > 0 } cn && !block.context_pre_only)
            {
                double interval_control = (double)transformer_blocks.Count / cn.Count;
                var next_h = h + cn[(int)(index_block / interval_control)];
                h.Dispose();
                h = next_h;
            }
        }

        h = norm_out.forward(h, temb);
        h = proj_out.forward(h);

        // unpatchify: [B, h·w, p·p·C] -> [B, C, h·p, w·p]
        long gh = height / p, gw = width / p;
        h = h.reshape(h.shape[0], gh, gw, p, p, out_channels);
        h = einsum("nhwpqc->nchpwq", h);
        var output = h.reshape(h.shape[0], out_channels, gh * p, gw * p);
        return output.MoveToOuterDisposeScope();
    }
}
