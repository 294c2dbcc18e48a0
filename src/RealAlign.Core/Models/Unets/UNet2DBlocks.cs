using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models.Unets;

// Blocks of diffusers models/unets/unet_2d_blocks.py (0.32.2) that the VAE uses. Constructor
// parameters mirror upstream's keyword arguments; field names are the checkpoint keys.

/// <summary>
/// diffusers <c>UNetMidBlock2D</c>: resnet, then <paramref name="numLayers"/> × (attention, resnet).
/// Attention heads are <c>in_channels / attention_head_dim</c> (one head in the VAE).
/// </summary>
public sealed class UNetMidBlock2D : nn.Module<Tensor, Tensor?, Tensor>
{
    private readonly ModuleList<SpatialSelfAttention> attentions;
    private readonly ModuleList<ResnetBlock2D> resnets;

    public bool AddAttention { get; }

    public UNetMidBlock2D(long inChannels, long? tembChannels, double dropout = 0.0, int numLayers = 1,
        double resnetEps = 1e-6, string resnetTimeScaleShift = "default", string resnetActFn = "swish",
        long? resnetGroups = 32, long? attnGroups = null, bool addAttention = true, long? attentionHeadDim = 1,
        double outputScaleFactor = 1.0) : base(nameof(UNetMidBlock2D))
    {
        if (resnetTimeScaleShift == "spatial")
            throw new NotSupportedException("UNetMidBlock2D: resnet_time_scale_shift 'spatial' (ResnetBlockCondNorm2D, SpatialNorm) is not implemented.");
        long groups = resnetGroups ?? Math.Min(inChannels / 4, 32);
        // Upstream: attention groups follow the resnet groups only for the "default" time-scale shift.
        long? attentionGroups = attnGroups ?? (resnetTimeScaleShift == "default" ? groups : null);
        long headDim = attentionHeadDim ?? inChannels;
        AddAttention = addAttention;

        ResnetBlock2D Resnet() => new(inChannels, inChannels, dropout, tembChannels, groups, eps: resnetEps,
            nonLinearity: resnetActFn, timeEmbeddingNorm: resnetTimeScaleShift, outputScaleFactor: outputScaleFactor);

        resnets = new ModuleList<ResnetBlock2D>(Resnet());
        attentions = new ModuleList<SpatialSelfAttention>();
        for (int i = 0; i < numLayers; i++)
        {
            if (addAttention)
                attentions.Add(new SpatialSelfAttention(inChannels, heads: inChannels / headDim, dimHead: headDim,
                    rescaleOutputFactor: outputScaleFactor, eps: resnetEps, normNumGroups: attentionGroups,
                    residualConnection: true, bias: true));
            resnets.Add(Resnet());
        }
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states, Tensor? temb)
    {
        using var scope = NewDisposeScope();
        hidden_states = resnets[0].call(hidden_states, temb);
        for (int i = 1; i < resnets.Count; i++)
        {
            if (AddAttention) hidden_states = attentions[i - 1].call(hidden_states);
            hidden_states = resnets[i].call(hidden_states, temb);
        }
        return hidden_states.MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers <c>DownEncoderBlock2D</c>: resnets without time embedding, then an optional stride-2 downsampler.</summary>
public sealed class DownEncoderBlock2D : nn.Module<Tensor, Tensor>
{
    private readonly ModuleList<ResnetBlock2D> resnets;
    private readonly ModuleList<Downsample2D>? downsamplers;

    public DownEncoderBlock2D(long inChannels, long outChannels, double dropout = 0.0, int numLayers = 1,
        double resnetEps = 1e-6, string resnetTimeScaleShift = "default", string resnetActFn = "swish",
        long resnetGroups = 32, double outputScaleFactor = 1.0, bool addDownsample = true,
        long downsamplePadding = 1) : base(nameof(DownEncoderBlock2D))
    {
        if (resnetTimeScaleShift == "spatial")
            throw new NotSupportedException("DownEncoderBlock2D: resnet_time_scale_shift 'spatial' is not implemented.");
        resnets = new ModuleList<ResnetBlock2D>();
        for (int i = 0; i < numLayers; i++)
            resnets.Add(new ResnetBlock2D(i == 0 ? inChannels : outChannels, outChannels, dropout, tembChannels: null,
                groups: resnetGroups, eps: resnetEps, nonLinearity: resnetActFn, timeEmbeddingNorm: resnetTimeScaleShift,
                outputScaleFactor: outputScaleFactor));
        if (addDownsample)
            downsamplers = new ModuleList<Downsample2D>(
                new Downsample2D(outChannels, useConv: true, outChannels: outChannels, padding: downsamplePadding));
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states)
    {
        using var scope = NewDisposeScope();
        foreach (var resnet in resnets) hidden_states = resnet.call(hidden_states, null);
        if (downsamplers is not null)
            foreach (var downsampler in downsamplers) hidden_states = downsampler.call(hidden_states);
        return hidden_states.MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers <c>UpDecoderBlock2D</c>: resnets, then an optional nearest ×2 + conv upsampler.</summary>
public sealed class UpDecoderBlock2D : nn.Module<Tensor, Tensor?, Tensor>
{
    private readonly ModuleList<ResnetBlock2D> resnets;
    private readonly ModuleList<Upsample2D>? upsamplers;

    public int? ResolutionIdx { get; }

    public UpDecoderBlock2D(long inChannels, long outChannels, int? resolutionIdx = null, double dropout = 0.0,
        int numLayers = 1, double resnetEps = 1e-6, string resnetTimeScaleShift = "default", string resnetActFn = "swish",
        long resnetGroups = 32, double outputScaleFactor = 1.0, bool addUpsample = true, long? tembChannels = null)
        : base(nameof(UpDecoderBlock2D))
    {
        if (resnetTimeScaleShift == "spatial")
            throw new NotSupportedException("UpDecoderBlock2D: resnet_time_scale_shift 'spatial' is not implemented.");
        ResolutionIdx = resolutionIdx;
        resnets = new ModuleList<ResnetBlock2D>();
        for (int i = 0; i < numLayers; i++)
            resnets.Add(new ResnetBlock2D(i == 0 ? inChannels : outChannels, outChannels, dropout, tembChannels,
                groups: resnetGroups, eps: resnetEps, nonLinearity: resnetActFn, timeEmbeddingNorm: resnetTimeScaleShift,
                outputScaleFactor: outputScaleFactor));
        if (addUpsample)
            upsamplers = new ModuleList<Upsample2D>(new Upsample2D(outChannels, useConv: true, outChannels: outChannels));
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states, Tensor? temb)
    {
        using var scope = NewDisposeScope();
        foreach (var resnet in resnets) hidden_states = resnet.call(hidden_states, temb);
        if (upsamplers is not null)
            foreach (var upsampler in upsamplers) hidden_states = upsampler.call(hidden_states);
        return hidden_states.MoveToOuterDisposeScope();
    }
}
