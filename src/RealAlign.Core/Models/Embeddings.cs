using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models;

/// <summary>Functional helpers of diffusers <c>models/embeddings.py</c> (v0.32.2), same names and arguments.</summary>
public static class Embeddings
{
    /// <summary>
    /// Sinusoidal timestep embedding (DDPM): <c>[sin(t·f), cos(t·f)]</c> with
    /// <c>f_i = exp(-ln(max_period)·i / (half − downscale_freq_shift))</c>; <paramref name="timesteps"/> is 1-D and may be fractional.
    /// </summary>
    public static Tensor get_timestep_embedding(Tensor timesteps, long embedding_dim, bool flip_sin_to_cos = false,
        double downscale_freq_shift = 1, double scale = 1, double max_period = 10000)
    {
        if (timesteps.dim() != 1)
            throw new ArgumentException($"timesteps must be 1-D, got shape [{string.Join(",", timesteps.shape)}]", nameof(timesteps));
        using var scope = NewDisposeScope();
        long half_dim = embedding_dim / 2;
        var exponent = arange(0, half_dim, dtype: ScalarType.Float32, device: timesteps.device) * -Math.Log(max_period);
        exponent = exponent / (half_dim - downscale_freq_shift);
        var emb = exp(exponent);
        emb = timesteps.unsqueeze(1).to(ScalarType.Float32) * emb.unsqueeze(0);
        emb = emb * scale;
        emb = cat([sin(emb), cos(emb)], dim: -1);
        if (flip_sin_to_cos)
            emb = cat([emb.narrow(1, half_dim, half_dim), emb.narrow(1, 0, half_dim)], dim: -1);
        if (embedding_dim % 2 == 1)
            emb = nn.functional.pad(emb, [0, 1, 0, 0]);
        return emb.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// 2-D sin-cos position table (MAE / DiT) for a <c>grid_size = (h, w)</c> grid, shape <c>[h·w, embed_dim]</c>, float64.
    /// Mirrors upstream exactly, including that its first half encodes the <c>w</c> coordinate (meshgrid "xy").
    /// </summary>
    public static Tensor get_2d_sincos_pos_embed(long embed_dim, (long h, long w) grid_size, bool cls_token = false,
        long extra_tokens = 0, double interpolation_scale = 1.0, double base_size = 16, Device? device = null)
    {
        using var scope = NewDisposeScope();
        var grid_h = arange(grid_size.h, dtype: ScalarType.Float32, device: device) / (grid_size.h / base_size) / interpolation_scale;
        var grid_w = arange(grid_size.w, dtype: ScalarType.Float32, device: device) / (grid_size.w / base_size) / interpolation_scale;
        var grid = stack(meshgrid([grid_w, grid_h], indexing: "xy"), dim: 0);
        grid = grid.reshape(2, 1, grid_size.w, grid_size.h);
        var pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid);
        if (cls_token && extra_tokens > 0)
            pos_embed = cat([zeros([extra_tokens, embed_dim], dtype: pos_embed.dtype, device: pos_embed.device), pos_embed], dim: 0);
        return pos_embed.MoveToOuterDisposeScope();
    }

    public static Tensor get_2d_sincos_pos_embed(long embed_dim, long grid_size, bool cls_token = false, long extra_tokens = 0,
        double interpolation_scale = 1.0, double base_size = 16, Device? device = null) =>
        get_2d_sincos_pos_embed(embed_dim, (grid_size, grid_size), cls_token, extra_tokens, interpolation_scale, base_size, device);

    /// <summary>Half the channels encode <c>grid[0]</c>, the other half <c>grid[1]</c>.</summary>
    public static Tensor get_2d_sincos_pos_embed_from_grid(long embed_dim, Tensor grid)
    {
        if (embed_dim % 2 != 0) throw new ArgumentException($"embed_dim must be divisible by 2, got {embed_dim}", nameof(embed_dim));
        using var scope = NewDisposeScope();
        var emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim / 2, grid[0]); // (H*W, D/2)
        var emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim / 2, grid[1]); // (H*W, D/2)
        return cat([emb_h, emb_w], dim: 1).MoveToOuterDisposeScope();
    }

    /// <summary><c>[sin(pos ⊗ ω), cos(pos ⊗ ω)]</c> with <c>ω_i = 1 / 10000^(i / (D/2))</c> in float64.</summary>
    public static Tensor get_1d_sincos_pos_embed_from_grid(long embed_dim, Tensor pos)
    {
        if (embed_dim % 2 != 0) throw new ArgumentException($"embed_dim must be divisible by 2, got {embed_dim}", nameof(embed_dim));
        using var scope = NewDisposeScope();
        var omega = arange(embed_dim / 2, dtype: ScalarType.Float64, device: pos.device);
        omega = omega / (embed_dim / 2.0);
        using var base_ = tensor(10000.0, dtype: ScalarType.Float64, device: pos.device);
        omega = base_.pow(omega).reciprocal();
        var @out = outer(pos.reshape(-1), omega);
        return cat([sin(@out), cos(@out)], dim: 1).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// diffusers <c>PatchEmbed</c>: a patchifying Conv2d plus a 2-D sin-cos position table. With
/// <c>pos_embed_max_size</c> (SD3) the table covers the largest grid, is stored in checkpoints (persistent
/// buffer <c>pos_embed</c>) and is centre-cropped to the input's grid.
/// </summary>
public sealed class PatchEmbed : nn.Module<Tensor, Tensor>
{
    public Conv2d proj;
    public LayerNorm? norm;
    public Tensor? pos_embed;

    private readonly long _patch_size;
    private readonly long _height, _width;
    private readonly long _base_size;
    private readonly double _interpolation_scale;
    private readonly long? _pos_embed_max_size;

    public PatchEmbed(long height = 224, long width = 224, long patch_size = 16, long in_channels = 3, long embed_dim = 768,
        bool layer_norm = false, bool bias = true, double interpolation_scale = 1, string? pos_embed_type = "sincos",
        long? pos_embed_max_size = null) : base(nameof(PatchEmbed))
    {
        long num_patches = (height / patch_size) * (width / patch_size);
        _pos_embed_max_size = pos_embed_max_size;
        proj = nn.Conv2d(in_channels, embed_dim, kernel_size: patch_size, stride: patch_size, bias: bias);
        if (layer_norm) norm = nn.LayerNorm(embed_dim, eps: 1e-6, elementwise_affine: false);
        _patch_size = patch_size;
        (_height, _width) = (height / patch_size, width / patch_size);
        _base_size = height / patch_size;
        _interpolation_scale = interpolation_scale;

        long grid_size = pos_embed_max_size is { } max && max != 0 ? max : (long)Math.Sqrt(num_patches);
        if (pos_embed_type == "sincos")
        {
            using var table = Embeddings.get_2d_sincos_pos_embed(embed_dim, grid_size, base_size: _base_size,
                interpolation_scale: _interpolation_scale);
            pos_embed = table.to(ScalarType.Float32).unsqueeze(0).DetachFromDisposeScope();
            // Only the SD3 (cropping) variant stores the table in checkpoints.
            register_buffer(nameof(pos_embed), pos_embed, persistent: _pos_embed_max_size is > 0);
        }
        else if (pos_embed_type is not null)
            throw new ArgumentException($"PatchEmbed: unsupported pos_embed_type '{pos_embed_type}'", nameof(pos_embed_type));
        RegisterComponents();
    }

    /// <summary>Centre crop of the stored table to a <c>height × width</c> latent (in latent pixels).</summary>
    public Tensor cropped_pos_embed(long height, long width)
    {
        if (_pos_embed_max_size is not { } max) throw new InvalidOperationException("`pos_embed_max_size` must be set for cropping.");
        height /= _patch_size;
        width /= _patch_size;
        if (height > max) throw new ArgumentException($"Height ({height}) cannot be greater than `pos_embed_max_size`: {max}.");
        if (width > max) throw new ArgumentException($"Width ({width}) cannot be greater than `pos_embed_max_size`: {max}.");
        long top = (max - height) / 2;
        long left = (max - width) / 2;
        using var scope = NewDisposeScope();
        var spatial = pos_embed!.reshape(1, max, max, -1).narrow(1, top, height).narrow(2, left, width);
        return spatial.reshape(1, -1, spatial.shape[^1]).MoveToOuterDisposeScope();
    }

    public override Tensor forward(Tensor latent)
    {
        using var scope = NewDisposeScope();
        long height, width;
        if (_pos_embed_max_size is not null) (height, width) = (latent.shape[^2], latent.shape[^1]);
        else (height, width) = (latent.shape[^2] / _patch_size, latent.shape[^1] / _patch_size);
        var x = proj.forward(latent).flatten(2).transpose(1, 2); // BCHW -> BNC
        if (norm is not null) x = norm.forward(x);
        if (pos_embed is null) return x.MoveToOuterDisposeScope();

        Tensor pe;
        if (_pos_embed_max_size is > 0) pe = cropped_pos_embed(height, width);
        else if (_height != height || _width != width)
            pe = Embeddings.get_2d_sincos_pos_embed(pos_embed.shape[^1], (height, width), base_size: _base_size,
                interpolation_scale: _interpolation_scale, device: latent.device).to(ScalarType.Float32).unsqueeze(0);
        else pe = pos_embed;
        return (x + pe).to(x.dtype).MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers <c>Timesteps</c>: the parameter-free sinusoidal projection of the timestep.</summary>
public sealed class Timesteps : nn.Module<Tensor, Tensor>
{
    public long num_channels { get; }
    public bool flip_sin_to_cos { get; }
    public double downscale_freq_shift { get; }
    public double scale { get; }

    public Timesteps(long num_channels, bool flip_sin_to_cos, double downscale_freq_shift, double scale = 1) : base(nameof(Timesteps))
    {
        this.num_channels = num_channels;
        this.flip_sin_to_cos = flip_sin_to_cos;
        this.downscale_freq_shift = downscale_freq_shift;
        this.scale = scale;
        RegisterComponents();
    }

    public override Tensor forward(Tensor timesteps) =>
        Embeddings.get_timestep_embedding(timesteps, num_channels, flip_sin_to_cos, downscale_freq_shift, scale);
}

/// <summary>diffusers <c>TimestepEmbedding</c>: <c>linear_2(act(linear_1(sample)))</c>.</summary>
public sealed class TimestepEmbedding : nn.Module<Tensor, Tensor>
{
    public LoRACompatibleLinear linear_1;
    public nn.Module<Tensor, Tensor> act;
    public LoRACompatibleLinear linear_2;

    public TimestepEmbedding(long in_channels, long time_embed_dim, string act_fn = "silu", long? out_dim = null,
        bool sample_proj_bias = true) : base(nameof(TimestepEmbedding))
    {
        linear_1 = new LoRACompatibleLinear(in_channels, time_embed_dim, sample_proj_bias);
        act = Activations.get_activation(act_fn);
        linear_2 = new LoRACompatibleLinear(time_embed_dim, out_dim ?? time_embed_dim, sample_proj_bias);
        RegisterComponents();
    }

    public override Tensor forward(Tensor sample)
    {
        using var scope = NewDisposeScope();
        return linear_2.forward(act.forward(linear_1.forward(sample))).MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers <c>PixArtAlphaTextProjection</c>: <c>linear_2(act_1(linear_1(caption)))</c>.</summary>
public sealed class PixArtAlphaTextProjection : nn.Module<Tensor, Tensor>
{
    public LoRACompatibleLinear linear_1;
    public nn.Module<Tensor, Tensor> act_1;
    public LoRACompatibleLinear linear_2;

    public PixArtAlphaTextProjection(long in_features, long hidden_size, long? out_features = null, string act_fn = "gelu_tanh")
        : base(nameof(PixArtAlphaTextProjection))
    {
        linear_1 = new LoRACompatibleLinear(in_features, hidden_size, hasBias: true);
        act_1 = act_fn switch
        {
            "gelu_tanh" or "silu" => Activations.get_activation(act_fn),
            _ => throw new ArgumentException($"PixArtAlphaTextProjection: unknown act_fn '{act_fn}'", nameof(act_fn)),
        };
        linear_2 = new LoRACompatibleLinear(hidden_size, out_features ?? hidden_size, hasBias: true);
        RegisterComponents();
    }

    public override Tensor forward(Tensor caption)
    {
        using var scope = NewDisposeScope();
        return linear_2.forward(act_1.forward(linear_1.forward(caption))).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// diffusers <c>CombinedTimestepTextProjEmbeddings</c> (SD3): <c>timestep_embedder(time_proj(t)) + text_embedder(pooled)</c>,
/// with a 256-channel cos-first sinusoidal projection.
/// </summary>
public sealed class CombinedTimestepTextProjEmbeddings : nn.Module<Tensor, Tensor, Tensor>
{
    public Timesteps time_proj;
    public TimestepEmbedding timestep_embedder;
    public PixArtAlphaTextProjection text_embedder;

    public CombinedTimestepTextProjEmbeddings(long embedding_dim, long pooled_projection_dim) : base(nameof(CombinedTimestepTextProjEmbeddings))
    {
        time_proj = new Timesteps(num_channels: 256, flip_sin_to_cos: true, downscale_freq_shift: 0);
        timestep_embedder = new TimestepEmbedding(in_channels: 256, time_embed_dim: embedding_dim);
        text_embedder = new PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim, act_fn: "silu");
        RegisterComponents();
    }

    public override Tensor forward(Tensor timestep, Tensor pooled_projection)
    {
        using var scope = NewDisposeScope();
        var timesteps_proj = time_proj.forward(timestep);
        var timesteps_emb = timestep_embedder.forward(timesteps_proj.to(pooled_projection.dtype)); // (N, D)
        var pooled_projections = text_embedder.forward(pooled_projection);
        return (timesteps_emb + pooled_projections).MoveToOuterDisposeScope();
    }
}
