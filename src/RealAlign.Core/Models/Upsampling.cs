using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models;

/// <summary>
/// diffusers <c>Upsample2D</c> (models/upsampling.py): nearest-neighbour ×2 (or to an explicit
/// output size) followed by an optional 3×3 convolution, or a transposed convolution.
/// </summary>
/// <remarks>Only the default <c>name="conv"</c> layout is built.</remarks>
public sealed class Upsample2D : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor>? conv;

    public long Channels { get; }
    public long OutChannels { get; }
    public bool UseConv { get; }
    public bool UseConvTranspose { get; }
    public bool Interpolate { get; }

    public Upsample2D(long channels, bool useConv = false, bool useConvTranspose = false, long? outChannels = null,
        long? kernelSize = null, long padding = 1, bool bias = true, bool interpolate = true) : base(nameof(Upsample2D))
    {
        Channels = channels;
        OutChannels = outChannels ?? channels;
        UseConv = useConv;
        UseConvTranspose = useConvTranspose;
        Interpolate = interpolate;
        if (useConvTranspose)
            conv = nn.ConvTranspose2d(channels, OutChannels, kernel_size: kernelSize ?? 4, stride: 2, padding: padding, bias: bias);
        else if (useConv)
            conv = nn.Conv2d(channels, OutChannels, kernel_size: kernelSize ?? 3, padding: padding, bias: bias);
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states) => forward(hidden_states, null);

    /// <param name="outputSize">target [H, W] instead of ×2 (UNet up blocks pass the skip's size).</param>
    public Tensor forward(Tensor hidden_states, long[]? outputSize)
    {
        if (hidden_states.shape[1] != Channels)
            throw new ArgumentException($"Upsample2D: expected {Channels} channels, got shape [{string.Join(",", hidden_states.shape)}]");
        if (UseConvTranspose) return conv!.call(hidden_states);
        if (!Interpolate && !UseConv) return hidden_states.alias();

        using var scope = NewDisposeScope();
        if (Interpolate)
        {
            hidden_states = outputSize is null
                ? nn.functional.interpolate(hidden_states, scale_factor: [2.0, 2.0], mode: InterpolationMode.Nearest)
                : nn.functional.interpolate(hidden_states, size: outputSize, mode: InterpolationMode.Nearest);
        }
        if (UseConv) hidden_states = conv!.call(hidden_states);
        return hidden_states.MoveToOuterDisposeScope();
    }
}
