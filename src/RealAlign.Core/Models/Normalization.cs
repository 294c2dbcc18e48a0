using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models;

// Normalisation layers of diffusers models/normalization.py (v0.32.2). Field names are the
// checkpoint keys (`linear`, `norm`, `weight`).

/// <summary>
/// diffusers <c>RMSNorm</c>: <c>x * rsqrt(mean(x², -1) + eps)</c> with the statistic taken in float32,
/// then an optional elementwise <c>weight</c> (and <c>bias</c>).
/// </summary>
public sealed class RMSNorm : nn.Module<Tensor, Tensor>
{
    public Parameter? weight;
    public Parameter? bias;
    private readonly double _eps;

    public RMSNorm(long dim, double eps, bool elementwise_affine = true, bool bias = false) : base(nameof(RMSNorm))
    {
        _eps = eps;
        if (elementwise_affine)
        {
            weight = new Parameter(ones(dim));
            if (bias) this.bias = new Parameter(zeros(dim));
        }
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states)
    {
        using var scope = NewDisposeScope();
        var input_dtype = hidden_states.dtype;
        var variance = hidden_states.to(ScalarType.Float32).pow(2).mean([-1], keepdim: true);
        // hidden_states (input dtype) * float32 rsqrt promotes to float32, as upstream.
        var h = hidden_states * torch.rsqrt(variance + _eps);
        if (weight is not null)
        {
            if (weight.dtype is ScalarType.Float16 or ScalarType.BFloat16) h = h.to(weight.dtype);
            h = h * weight;
            if (bias is not null) h = h + bias;
        }
        else
        {
            h = h.to(input_dtype);
        }
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// diffusers <c>AdaLayerNormZero</c> (adaLN-Zero, DiT arXiv:2212.09748) conditioned on a precomputed
/// embedding <c>emb</c>. Returns <c>(x, gate_msa, shift_mlp, scale_mlp, gate_mlp)</c>.
/// The class-label variant (<c>num_embeddings</c>) is not used by SD3 and not ported.
/// </summary>
public sealed class AdaLayerNormZero : nn.Module<Tensor, Tensor, (Tensor x, Tensor gate_msa, Tensor shift_mlp, Tensor scale_mlp, Tensor gate_mlp)>
{
    public SiLU silu;
    public LoRACompatibleLinear linear;
    public LayerNorm norm;

    public AdaLayerNormZero(long embedding_dim, string norm_type = "layer_norm", bool bias = true) : base(nameof(AdaLayerNormZero))
    {
        if (norm_type != "layer_norm")
            throw new ArgumentException($"AdaLayerNormZero: unsupported norm_type '{norm_type}' (only 'layer_norm' is ported)", nameof(norm_type));
        silu = nn.SiLU();
        linear = new LoRACompatibleLinear(embedding_dim, 6 * embedding_dim, bias);
        norm = nn.LayerNorm(embedding_dim, eps: 1e-6, elementwise_affine: false);
        RegisterComponents();
    }

    public override (Tensor x, Tensor gate_msa, Tensor shift_mlp, Tensor scale_mlp, Tensor gate_mlp) forward(Tensor x, Tensor emb)
    {
        using var scope = NewDisposeScope();
        var c = linear.forward(silu.forward(emb)).chunk(6, dim: 1);
        var (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = (c[0], c[1], c[2], c[3], c[4], c[5]);
        var y = norm.forward(x) * (scale_msa.unsqueeze(1) + 1) + shift_msa.unsqueeze(1);
        return (y.MoveToOuterDisposeScope(), gate_msa.MoveToOuterDisposeScope(), shift_mlp.MoveToOuterDisposeScope(),
            scale_mlp.MoveToOuterDisposeScope(), gate_mlp.MoveToOuterDisposeScope());
    }
}

/// <summary>
/// diffusers <c>SD35AdaLayerNormZeroX</c>: adaLN-Zero with a second modulation of the same normalised
/// input for the image-only attention (<c>attn2</c>) of SD3.5 dual-attention (MMDiT-X) blocks.
/// Returns <c>(x, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2)</c>.
/// </summary>
public sealed class SD35AdaLayerNormZeroX : nn.Module<Tensor, Tensor,
    (Tensor x, Tensor gate_msa, Tensor shift_mlp, Tensor scale_mlp, Tensor gate_mlp, Tensor norm_hidden_states2, Tensor gate_msa2)>
{
    public SiLU silu;
    public LoRACompatibleLinear linear;
    public LayerNorm norm;

    public SD35AdaLayerNormZeroX(long embedding_dim, string norm_type = "layer_norm", bool bias = true) : base(nameof(SD35AdaLayerNormZeroX))
    {
        if (norm_type != "layer_norm")
            throw new ArgumentException($"SD35AdaLayerNormZeroX: unsupported norm_type '{norm_type}' (only 'layer_norm')", nameof(norm_type));
        silu = nn.SiLU();
        linear = new LoRACompatibleLinear(embedding_dim, 9 * embedding_dim, bias);
        norm = nn.LayerNorm(embedding_dim, eps: 1e-6, elementwise_affine: false);
        RegisterComponents();
    }

    public override (Tensor x, Tensor gate_msa, Tensor shift_mlp, Tensor scale_mlp, Tensor gate_mlp, Tensor norm_hidden_states2, Tensor gate_msa2)
        forward(Tensor hidden_states, Tensor emb)
    {
        using var scope = NewDisposeScope();
        var c = linear.forward(silu.forward(emb)).chunk(9, dim: 1);
        var (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = (c[0], c[1], c[2], c[3], c[4], c[5]);
        var (shift_msa2, scale_msa2, gate_msa2) = (c[6], c[7], c[8]);
        var norm_hidden_states = norm.forward(hidden_states);
        var x = norm_hidden_states * (scale_msa.unsqueeze(1) + 1) + shift_msa.unsqueeze(1);
        var norm_hidden_states2 = norm_hidden_states * (scale_msa2.unsqueeze(1) + 1) + shift_msa2.unsqueeze(1);
        return (x.MoveToOuterDisposeScope(), gate_msa.MoveToOuterDisposeScope(), shift_mlp.MoveToOuterDisposeScope(),
            scale_mlp.MoveToOuterDisposeScope(), gate_mlp.MoveToOuterDisposeScope(),
            norm_hidden_states2.MoveToOuterDisposeScope(), gate_msa2.MoveToOuterDisposeScope());
    }
}

/// <summary>
/// diffusers <c>AdaLayerNormContinuous</c>: <c>norm(x) * (1 + scale) + shift</c> with
/// <c>(scale, shift) = linear(silu(conditioning))</c> — note the order: scale first.
/// </summary>
public sealed class AdaLayerNormContinuous : nn.Module<Tensor, Tensor, Tensor>
{
    public SiLU silu;
    public LoRACompatibleLinear linear;
    public nn.Module<Tensor, Tensor> norm;

    public AdaLayerNormContinuous(long embedding_dim, long conditioning_embedding_dim, bool elementwise_affine = true,
        double eps = 1e-5, bool bias = true, string norm_type = "layer_norm") : base(nameof(AdaLayerNormContinuous))
    {
        silu = nn.SiLU();
        linear = new LoRACompatibleLinear(conditioning_embedding_dim, embedding_dim * 2, bias);
        norm = norm_type switch
        {
            "layer_norm" => nn.LayerNorm(embedding_dim, eps, elementwise_affine, bias),
            "rms_norm" => new RMSNorm(embedding_dim, eps, elementwise_affine),
            _ => throw new ArgumentException($"AdaLayerNormContinuous: unknown norm_type '{norm_type}'", nameof(norm_type)),
        };
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor conditioning_embedding)
    {
        using var scope = NewDisposeScope();
        // Upstream casts back to x's dtype in case the conditioning was upcast (HunyuanDiT).
        var emb = linear.forward(silu.forward(conditioning_embedding).to(x.dtype));
        var c = emb.chunk(2, dim: 1);
        var (scale, shift) = (c[0], c[1]);
        var y = norm.forward(x) * (scale + 1).unsqueeze(1) + shift.unsqueeze(1);
        return y.MoveToOuterDisposeScope();
    }
}
