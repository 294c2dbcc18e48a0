using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models;

/// <summary>
/// diffusers <c>Attention</c> (models/attention_processor.py) as <c>UNetMidBlock2D</c> builds it for
/// feature maps: <c>group_norm</c> over channels, single- or multi-head self-attention over the H·W
/// positions with <c>to_q/to_k/to_v/to_out.0</c>, a residual connection and division by
/// <c>rescale_output_factor</c>, computed the way <c>AttnProcessor2_0</c> does on a 4-D input.
/// Parameter names are diffusers' (the deprecated query/key/value/proj_attn names are not accepted).
/// </summary>
public sealed class SpatialSelfAttention : nn.Module<Tensor, Tensor>
{
    private readonly GroupNorm? group_norm;
    private readonly LoRACompatibleLinear to_q;
    private readonly LoRACompatibleLinear to_k;
    private readonly LoRACompatibleLinear to_v;
    private readonly ModuleList<nn.Module<Tensor, Tensor>> to_out;

    public long Heads { get; }
    public double RescaleOutputFactor { get; }
    public bool ResidualConnection { get; }

    public SpatialSelfAttention(long queryDim, long heads = 8, long dimHead = 64, double rescaleOutputFactor = 1.0,
        double eps = 1e-5, long? normNumGroups = null, bool residualConnection = false, bool bias = false,
        bool outBias = true, double dropout = 0.0) : base(nameof(SpatialSelfAttention))
    {
        long innerDim = dimHead * heads;
        Heads = heads;
        RescaleOutputFactor = rescaleOutputFactor;
        ResidualConnection = residualConnection;
        if (normNumGroups is long g) group_norm = nn.GroupNorm(g, queryDim, eps, affine: true);
        to_q = new LoRACompatibleLinear(queryDim, innerDim, bias);
        to_k = new LoRACompatibleLinear(queryDim, innerDim, bias);
        to_v = new LoRACompatibleLinear(queryDim, innerDim, bias);
        to_out = new ModuleList<nn.Module<Tensor, Tensor>>(new LoRACompatibleLinear(innerDim, queryDim, outBias), nn.Dropout(dropout));
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states)
    {
        using var scope = NewDisposeScope();
        var residual = hidden_states;
        long ndim = hidden_states.dim();
        long batch = hidden_states.shape[0], channel = 0, height = 0, width = 0;
        if (ndim == 4)
        {
            (channel, height, width) = (hidden_states.shape[1], hidden_states.shape[2], hidden_states.shape[3]);
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2);
        }
        else if (ndim != 3)
            throw new ArgumentException($"SpatialSelfAttention expects [B,C,H,W] or [B,L,C], got [{string.Join(",", hidden_states.shape)}]");

        if (group_norm is not null)
            hidden_states = group_norm.call(hidden_states.transpose(1, 2)).transpose(1, 2);

        var query = to_q.call(hidden_states);
        var key = to_k.call(hidden_states);
        var value = to_v.call(hidden_states);

        long innerDim = key.shape[^1];
        long headDim = innerDim / Heads;
        query = query.view(batch, -1, Heads, headDim).transpose(1, 2);
        key = key.view(batch, -1, Heads, headDim).transpose(1, 2);
        value = value.view(batch, -1, Heads, headDim).transpose(1, 2);

        // Default scale 1/sqrt(head_dim), as upstream (scale_qk=True).
        hidden_states = nn.functional.scaled_dot_product_attention(query, key, value);
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, Heads * headDim).to(query.dtype);

        hidden_states = to_out[0].call(hidden_states);
        hidden_states = to_out[1].call(hidden_states);

        if (ndim == 4)
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width);
        if (ResidualConnection)
            hidden_states = hidden_states + residual;
        hidden_states = hidden_states / RescaleOutputFactor;
        return hidden_states.MoveToOuterDisposeScope();
    }
}
