using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models;

/// <summary>
/// diffusers <c>Attention</c> (models/attention_processor.py, v0.32.2): the projection layers and q/k
/// norms, with the computation delegated to a processor as upstream does. Ported: the joint
/// (MMDiT) layout used by SD3 — <c>to_q/to_k/to_v/to_out.0</c> (+ parameter-free dropout
/// <c>to_out.1</c>), the added context projections <c>add_q_proj/add_k_proj/add_v_proj/to_add_out</c>
/// and q/k norms (<c>norm_q/norm_k/norm_added_q/norm_added_k</c>). Not ported: group/spatial/cross
/// norms, kv_heads, residual_connection, rescale_output_factor.
/// </summary>
public sealed class Attention : nn.Module<Tensor, Tensor>
{
    public LoRACompatibleLinear to_q;
    public LoRACompatibleLinear? to_k;
    public LoRACompatibleLinear? to_v;
    public LoRACompatibleLinear? add_q_proj;
    public LoRACompatibleLinear? add_k_proj;
    public LoRACompatibleLinear? add_v_proj;
    public ModuleList<nn.Module<Tensor, Tensor>>? to_out;
    public LoRACompatibleLinear? to_add_out;
    public nn.Module<Tensor, Tensor>? norm_q;
    public nn.Module<Tensor, Tensor>? norm_k;
    public nn.Module<Tensor, Tensor>? norm_added_q;
    public nn.Module<Tensor, Tensor>? norm_added_k;

    /// <summary>Number of heads (<c>out_dim / dim_head</c> when out_dim is given, as upstream).</summary>
    public long heads { get; }
    public long inner_dim { get; }
    /// <summary>null: no context stream; false: joint attention that also projects the context output; true: context output is discarded (last SD3 block).</summary>
    public bool? context_pre_only { get; }
    /// <summary>Upstream's softmax scale <c>dim_head^-0.5</c>; SDPA applies the same default.</summary>
    public double scale { get; }

    public Attention(long query_dim, long? cross_attention_dim = null, long heads = 8, long dim_head = 64, double dropout = 0.0,
        bool bias = false, string? qk_norm = null, long? added_kv_proj_dim = null, bool added_proj_bias = true,
        bool out_bias = true, double eps = 1e-5, long? out_dim = null, long? out_context_dim = null,
        bool? context_pre_only = null, bool pre_only = false, bool elementwise_affine = true) : base(nameof(Attention))
    {
        inner_dim = out_dim ?? dim_head * heads;
        long cross_dim = cross_attention_dim ?? query_dim;
        long outDim = out_dim ?? query_dim;
        long outContextDim = out_context_dim ?? query_dim;
        this.context_pre_only = context_pre_only;
        this.heads = out_dim is { } od ? od / dim_head : heads;
        scale = Math.Pow(dim_head, -0.5);

        switch (qk_norm)
        {
            case null: break;
            case "layer_norm":
                norm_q = nn.LayerNorm(dim_head, eps, elementwise_affine);
                norm_k = nn.LayerNorm(dim_head, eps, elementwise_affine);
                break;
            case "rms_norm":
                norm_q = new RMSNorm(dim_head, eps);
                norm_k = new RMSNorm(dim_head, eps);
                break;
            default:
                throw new ArgumentException($"Attention: unsupported qk_norm '{qk_norm}' (ported: null, 'layer_norm', 'rms_norm')", nameof(qk_norm));
        }

        to_q = new LoRACompatibleLinear(query_dim, inner_dim, bias);
        to_k = new LoRACompatibleLinear(cross_dim, inner_dim, bias);
        to_v = new LoRACompatibleLinear(cross_dim, inner_dim, bias);

        if (added_kv_proj_dim is { } added)
        {
            add_k_proj = new LoRACompatibleLinear(added, inner_dim, added_proj_bias);
            add_v_proj = new LoRACompatibleLinear(added, inner_dim, added_proj_bias);
            if (context_pre_only is not null) add_q_proj = new LoRACompatibleLinear(added, inner_dim, added_proj_bias);
        }

        if (!pre_only)
            to_out = new ModuleList<nn.Module<Tensor, Tensor>>(new LoRACompatibleLinear(inner_dim, outDim, out_bias), nn.Dropout(dropout));

        if (context_pre_only == false) to_add_out = new LoRACompatibleLinear(inner_dim, outContextDim, out_bias);

        if (qk_norm is not null && added_kv_proj_dim is not null)
        {
            if (qk_norm != "rms_norm")
                throw new ArgumentException($"Attention: unsupported qk_norm '{qk_norm}' with added_kv_proj_dim (ported: 'rms_norm')", nameof(qk_norm));
            norm_added_q = new RMSNorm(dim_head, eps);
            norm_added_k = new RMSNorm(dim_head, eps);
        }
        RegisterComponents();
    }

    /// <summary>Self-attention over <paramref name="hidden_states"/> only (how SD3.5 dual-attention blocks call <c>attn2</c>).</summary>
    public override Tensor forward(Tensor hidden_states) => JointAttnProcessor2_0.Call(this, hidden_states, null).hidden_states;

    /// <summary>
    /// Joint attention over the concatenated image and context tokens. Returns the image part and the
    /// context part (projected by <c>to_add_out</c> unless <see cref="context_pre_only"/>).
    /// </summary>
    public (Tensor hidden_states, Tensor? encoder_hidden_states) forward(Tensor hidden_states, Tensor? encoder_hidden_states) =>
        JointAttnProcessor2_0.Call(this, hidden_states, encoder_hidden_states);
}

/// <summary>
/// diffusers <c>JointAttnProcessor2_0</c>: per-stream projections and q/k norms, one softmax attention
/// over <c>[image tokens ‖ context tokens]</c>, then the split back. With no context it is plain
/// self-attention (SD3.5's <c>attn2</c> uses this same processor).
/// </summary>
public static class JointAttnProcessor2_0
{
    public static (Tensor hidden_states, Tensor? encoder_hidden_states) Call(Attention attn, Tensor hidden_states, Tensor? encoder_hidden_states)
    {
        using var scope = NewDisposeScope();
        long batch_size = hidden_states.shape[0];
        long residual_len = hidden_states.shape[1];

        var query = attn.to_q.forward(hidden_states);
        var key = attn.to_k!.forward(hidden_states);
        var value = attn.to_v!.forward(hidden_states);

        long inner_dim = key.shape[^1];
        long head_dim = inner_dim / attn.heads;

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2);
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2);
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2);

        if (attn.norm_q is not null) query = attn.norm_q.forward(query);
        if (attn.norm_k is not null) key = attn.norm_k.forward(key);

        if (encoder_hidden_states is not null)
        {
            if (attn.add_q_proj is null || attn.add_k_proj is null || attn.add_v_proj is null)
                throw new InvalidOperationException("Attention was given encoder_hidden_states but has no added (context) projections");
            var q_ctx = attn.add_q_proj.forward(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2);
            var k_ctx = attn.add_k_proj.forward(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2);
            var v_ctx = attn.add_v_proj.forward(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2);

            if (attn.norm_added_q is not null) q_ctx = attn.norm_added_q.forward(q_ctx);
            if (attn.norm_added_k is not null) k_ctx = attn.norm_added_k.forward(k_ctx);

            query = cat([query, q_ctx], dim: 2);
            key = cat([key, k_ctx], dim: 2);
            value = cat([value, v_ctx], dim: 2);
        }

        // softmax(QKᵀ/√d)V; the default scale is upstream's attn.scale (scale_qk=True).
        var h = nn.functional.scaled_dot_product_attention(query, key, value, p: 0.0, is_casual: false);
        h = h.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype);

        Tensor? context = null;
        if (encoder_hidden_states is not null)
        {
            context = h.narrow(1, residual_len, h.shape[1] - residual_len);
            h = h.narrow(1, 0, residual_len);
            if (attn.context_pre_only != true)
                context = (attn.to_add_out ?? throw new InvalidOperationException("Attention has no to_add_out for the context output")).forward(context);
        }

        if (attn.to_out is { } to_out)
        {
            h = to_out[0].forward(h); // linear proj
            h = to_out[1].forward(h); // dropout
        }

        return (h.MoveToOuterDisposeScope(), context?.MoveToOuterDisposeScope());
    }
}

/// <summary>
/// diffusers <c>FeedForward</c> (models/attention.py): <c>net = [act_fn (with its projection), Dropout, Linear]</c>
/// so checkpoint keys are <c>net.0.proj.*</c> and <c>net.2.*</c>.
/// </summary>
public sealed class FeedForward : nn.Module<Tensor, Tensor>
{
    public ModuleList<nn.Module<Tensor, Tensor>> net;

    public FeedForward(long dim, long? dim_out = null, long mult = 4, double dropout = 0.0, string activation_fn = "geglu",
        bool final_dropout = false, long? inner_dim = null, bool bias = true) : base(nameof(FeedForward))
    {
        long inner = inner_dim ?? dim * mult;
        long outDim = dim_out ?? dim;
        nn.Module<Tensor, Tensor> act_fn = activation_fn switch
        {
            "gelu" => new GELU(dim, inner, bias: bias),
            "gelu-approximate" => new GELU(dim, inner, approximate: "tanh", bias: bias),
            "geglu" => new GEGLU(dim, inner, bias: bias),
            _ => throw new ArgumentException($"FeedForward: unsupported activation_fn '{activation_fn}' (ported: gelu, gelu-approximate, geglu)", nameof(activation_fn)),
        };
        net = new ModuleList<nn.Module<Tensor, Tensor>>(act_fn, nn.Dropout(dropout), new LoRACompatibleLinear(inner, outDim, bias));
        if (final_dropout) net.Add(nn.Dropout(dropout));
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states)
    {
        using var scope = NewDisposeScope();
        var h = hidden_states;
        foreach (var module in net) h = module.forward(h);
        return h.MoveToOuterDisposeScope();
    }
}
