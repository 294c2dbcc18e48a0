using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models;

/// <summary>
/// diffusers <c>Downsample2D</c> (models/downsampling.py): a stride-2 convolution, or 2×2 average
/// pooling without <paramref name="useConv"/>. With <c>padding == 0</c> the input is padded by one
/// pixel on the right and bottom first (the asymmetric padding the VAE encoder uses).
/// </summary>
/// <remarks>Only the <c>name="op"</c> layout (<c>conv</c>) is built; diffusers' default name also
/// aliases the conv as <c>Conv2d_0</c>, which no VAE/UNet block uses.</remarks>
public sealed class Downsample2D : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> conv;

    public long Channels { get; }
    public long OutChannels { get; }
    public bool UseConv { get; }
    public long Padding { get; }

    public Downsample2D(long channels, bool useConv = false, long? outChannels = null, long padding = 1,
        long kernelSize = 3, bool bias = true) : base(nameof(Downsample2D))
    {
        Channels = channels;
        OutChannels = outChannels ?? channels;
        UseConv = useConv;
        Padding = padding;
        if (useConv)
            conv = nn.Conv2d(channels, OutChannels, kernel_size: kernelSize, stride: 2, padding: padding, bias: bias);
        else
        {
            if (OutChannels != channels)
                throw new ArgumentException($"Downsample2D without conv keeps the channel count ({channels} != {OutChannels})");
            conv = nn.AvgPool2d(kernel_size: 2, stride: 2);
        }
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states)
    {
        if (hidden_states.shape[1] != Channels)
            throw new ArgumentException($"Downsample2D: expected {Channels} channels, got shape [{string.Join(",", hidden_states.shape)}]");
        if (UseConv && Padding == 0)
        {
            using var padded = nn.functional.pad(hidden_states, [0, 1, 0, 1], PaddingModes.Constant, 0);
            return conv.call(padded);
        }
        return conv.call(hidden_states);
    }
}
