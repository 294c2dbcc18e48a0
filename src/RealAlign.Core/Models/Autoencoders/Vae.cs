using RealAlign.Core.Models.Unets;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models.Autoencoders;

// diffusers models/autoencoders/vae.py (0.32.2): Encoder, Decoder, DiagonalGaussianDistribution.

/// <summary>
/// VAE encoder: conv_in → down blocks (stride-2 with right/bottom padding) → mid block (resnet,
/// attention, resnet) → GroupNorm → SiLU → conv_out to 2·latent channels (mean and logvar) when
/// <paramref name="doubleZ"/>.
/// </summary>
public sealed class Encoder : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d conv_in;
    private readonly ModuleList<DownEncoderBlock2D> down_blocks;
    private readonly UNetMidBlock2D mid_block;
    private readonly GroupNorm conv_norm_out;
    private readonly SiLU conv_act;
    private readonly Conv2d conv_out;

    public Encoder(long inChannels, long outChannels, IReadOnlyList<string> downBlockTypes, IReadOnlyList<long> blockOutChannels,
        int layersPerBlock = 2, long normNumGroups = 32, string actFn = "silu", bool doubleZ = true,
        bool midBlockAddAttention = true) : base(nameof(Encoder))
    {
        if (downBlockTypes.Count != blockOutChannels.Count)
            throw new ArgumentException($"Encoder: {downBlockTypes.Count} down_block_types but {blockOutChannels.Count} block_out_channels");
        conv_in = nn.Conv2d(inChannels, blockOutChannels[0], kernel_size: 3, stride: 1, padding: 1);

        down_blocks = new ModuleList<DownEncoderBlock2D>();
        long outputChannel = blockOutChannels[0];
        for (int i = 0; i < downBlockTypes.Count; i++)
        {
            long inputChannel = outputChannel;
            outputChannel = blockOutChannels[i];
            bool isFinal = i == blockOutChannels.Count - 1;
            if (downBlockTypes[i] != "DownEncoderBlock2D")
                throw new NotSupportedException($"Encoder: down block type '{downBlockTypes[i]}' (index {i}) is not implemented; only DownEncoderBlock2D.");
            // The encoder's downsamplers use padding 0, i.e. the (0,1,0,1) pad then a stride-2 conv.
            down_blocks.Add(new DownEncoderBlock2D(inputChannel, outputChannel, numLayers: layersPerBlock,
                resnetEps: 1e-6, resnetActFn: actFn, resnetGroups: normNumGroups, addDownsample: !isFinal, downsamplePadding: 0));
        }

        mid_block = new UNetMidBlock2D(blockOutChannels[^1], tembChannels: null, resnetEps: 1e-6, resnetTimeScaleShift: "default",
            resnetActFn: actFn, resnetGroups: normNumGroups, addAttention: midBlockAddAttention,
            attentionHeadDim: blockOutChannels[^1], outputScaleFactor: 1);

        conv_norm_out = nn.GroupNorm(normNumGroups, blockOutChannels[^1], 1e-6);
        conv_act = nn.SiLU();
        conv_out = nn.Conv2d(blockOutChannels[^1], doubleZ ? 2 * outChannels : outChannels, kernel_size: 3, padding: 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor sample)
    {
        using var scope = NewDisposeScope();
        sample = conv_in.call(sample);
        foreach (var block in down_blocks) sample = block.call(sample);
        sample = mid_block.call(sample, null);
        sample = conv_out.call(conv_act.call(conv_norm_out.call(sample)));
        return sample.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// VAE decoder: conv_in → mid block → up blocks (layers_per_block + 1 resnets each, nearest ×2 +
/// conv) → GroupNorm → SiLU → conv_out. Only the "group" norm type (no SpatialNorm / MoVQ).
/// </summary>
public sealed class Decoder : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d conv_in;
    private readonly ModuleList<UpDecoderBlock2D> up_blocks;
    private readonly UNetMidBlock2D mid_block;
    private readonly GroupNorm conv_norm_out;
    private readonly SiLU conv_act;
    private readonly Conv2d conv_out;

    public Decoder(long inChannels, long outChannels, IReadOnlyList<string> upBlockTypes, IReadOnlyList<long> blockOutChannels,
        int layersPerBlock = 2, long normNumGroups = 32, string actFn = "silu", string normType = "group",
        bool midBlockAddAttention = true) : base(nameof(Decoder))
    {
        if (normType != "group")
            throw new NotSupportedException($"Decoder: norm_type '{normType}' (SpatialNorm) is not implemented; only 'group'.");
        if (upBlockTypes.Count != blockOutChannels.Count)
            throw new ArgumentException($"Decoder: {upBlockTypes.Count} up_block_types but {blockOutChannels.Count} block_out_channels");
        conv_in = nn.Conv2d(inChannels, blockOutChannels[^1], kernel_size: 3, stride: 1, padding: 1);

        mid_block = new UNetMidBlock2D(blockOutChannels[^1], tembChannels: null, resnetEps: 1e-6, resnetTimeScaleShift: "default",
            resnetActFn: actFn, resnetGroups: normNumGroups, addAttention: midBlockAddAttention,
            attentionHeadDim: blockOutChannels[^1], outputScaleFactor: 1);

        up_blocks = new ModuleList<UpDecoderBlock2D>();
        var reversed = blockOutChannels.Reverse().ToArray();
        long outputChannel = reversed[0];
        for (int i = 0; i < upBlockTypes.Count; i++)
        {
            long prevOutputChannel = outputChannel;
            outputChannel = reversed[i];
            bool isFinal = i == blockOutChannels.Count - 1;
            if (upBlockTypes[i] != "UpDecoderBlock2D")
                throw new NotSupportedException($"Decoder: up block type '{upBlockTypes[i]}' (index {i}) is not implemented; only UpDecoderBlock2D.");
            up_blocks.Add(new UpDecoderBlock2D(prevOutputChannel, outputChannel, numLayers: layersPerBlock + 1,
                resnetEps: 1e-6, resnetActFn: actFn, resnetGroups: normNumGroups, addUpsample: !isFinal,
                tembChannels: null, resnetTimeScaleShift: normType));
        }

        conv_norm_out = nn.GroupNorm(normNumGroups, blockOutChannels[0], 1e-6);
        conv_act = nn.SiLU();
        conv_out = nn.Conv2d(blockOutChannels[0], outChannels, kernel_size: 3, padding: 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor sample)
    {
        using var scope = NewDisposeScope();
        sample = conv_in.call(sample);
        // Upstream runs the up blocks in their parameters' dtype (matters only for mixed-dtype models).
        var upscaleDtype = up_blocks.parameters().First().dtype;
        sample = mid_block.call(sample, null).to(upscaleDtype);
        foreach (var block in up_blocks) sample = block.call(sample, null);
        sample = conv_out.call(conv_act.call(conv_norm_out.call(sample)));
        return sample.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// The VAE posterior N(mean, exp(logvar)) (diffusers DiagonalGaussianDistribution): the encoder
/// output is split into mean and logvar along channels and logvar is clamped to [−30, 20].
/// Owns its tensors.
/// </summary>
public sealed class DiagonalGaussianDistribution : IDisposable
{
    public Tensor Mean { get; }
    public Tensor LogVar { get; }
    public Tensor Std { get; }
    public Tensor Var { get; }

    /// <param name="parameters">[B, 2·C, H, W] moments (the encoder output after quant_conv).</param>
    public DiagonalGaussianDistribution(Tensor parameters)
    {
        using var scope = NewDisposeScope();
        var chunks = parameters.chunk(2, dim: 1);
        Mean = chunks[0];
        LogVar = chunks[1].clamp(-30.0, 20.0);
        Std = (0.5 * LogVar).exp();
        Var = LogVar.exp();
        scope.MoveToOuter(Mean, LogVar, Std, Var);
    }

    /// <summary>mean + std·ε with ε ~ N(0, I) from <paramref name="generator"/>.</summary>
    public Tensor Sample(Generator? generator = null)
    {
        using var scope = NewDisposeScope();
        // As diffusers' randn_tensor: draw on the generator's device, then move to the mean's.
        var eps = torch.randn(Mean.shape, dtype: Mean.dtype, device: generator?.device ?? Mean.device, generator: generator).to(Mean.device);
        return (Mean + Std * eps).MoveToOuterDisposeScope();
    }

    /// <summary>The mode (= mean).</summary>
    public Tensor Mode() => Mean.alias();

    public void Dispose()
    {
        Mean.Dispose();
        LogVar.Dispose();
        Std.Dispose();
        Var.Dispose();
    }
}
