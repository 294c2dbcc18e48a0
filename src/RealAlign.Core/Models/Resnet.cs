using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models;

/// <summary>
/// diffusers <c>ResnetBlock2D</c> (models/resnet.py): GroupNorm → act → conv1 (+ time embedding) →
/// GroupNorm → act → dropout → conv2, plus a 1×1 <c>conv_shortcut</c> when the channel count changes;
/// the sum is divided by <c>output_scale_factor</c>. The forward's second argument is the time
/// embedding (null in the VAE).
/// </summary>
public sealed class ResnetBlock2D : nn.Module<Tensor, Tensor?, Tensor>
{
    private readonly GroupNorm norm1;
    private readonly Conv2d conv1;
    private readonly LoRACompatibleLinear? time_emb_proj;
    private readonly GroupNorm norm2;
    private readonly Dropout dropout;
    private readonly Conv2d conv2;
    private readonly nn.Module<Tensor, Tensor> nonlinearity;
    private readonly Upsample2D? upsample;
    private readonly Downsample2D? downsample;
    private readonly Conv2d? conv_shortcut;

    public long InChannels { get; }
    public long OutChannels { get; }
    public string TimeEmbeddingNorm { get; }
    public double OutputScaleFactor { get; }
    public bool SkipTimeAct { get; }

    /// <param name="timeEmbeddingNorm">"default" (add the projected embedding before norm2) or
    /// "scale_shift" (FiLM after norm2); "group" is what the VAE decoder passes and behaves like "default"
    /// without an embedding.</param>
    /// <param name="up">nearest ×2 upsampling of both paths before conv1 (diffusers' default kernel only).</param>
    /// <param name="down">2×2 average pooling of both paths before conv1 (diffusers' default kernel only).</param>
    public ResnetBlock2D(long inChannels, long? outChannels = null, double dropout = 0.0, long? tembChannels = 512,
        long groups = 32, long? groupsOut = null, double eps = 1e-6, string nonLinearity = "swish",
        bool skipTimeAct = false, string timeEmbeddingNorm = "default", double outputScaleFactor = 1.0,
        bool? useInShortcut = null, bool up = false, bool down = false, bool convShortcutBias = true,
        long? conv2dOutChannels = null) : base(nameof(ResnetBlock2D))
    {
        if (timeEmbeddingNorm is "ada_group" or "spatial")
            throw new NotSupportedException($"ResnetBlock2D: time_embedding_norm '{timeEmbeddingNorm}' needs ResnetBlockCondNorm2D, which is not implemented.");
        long outCh = outChannels ?? inChannels;
        InChannels = inChannels;
        OutChannels = outCh;
        TimeEmbeddingNorm = timeEmbeddingNorm;
        OutputScaleFactor = outputScaleFactor;
        SkipTimeAct = skipTimeAct;

        norm1 = nn.GroupNorm(groups, inChannels, eps, affine: true);
        conv1 = nn.Conv2d(inChannels, outCh, kernel_size: 3, stride: 1, padding: 1);
        if (tembChannels is long temb)
        {
            time_emb_proj = timeEmbeddingNorm switch
            {
                "default" => new LoRACompatibleLinear(temb, outCh),
                "scale_shift" => new LoRACompatibleLinear(temb, 2 * outCh),
                _ => throw new ArgumentException($"unknown time_embedding_norm: {timeEmbeddingNorm}", nameof(timeEmbeddingNorm)),
            };
        }
        norm2 = nn.GroupNorm(groupsOut ?? groups, outCh, eps, affine: true);
        this.dropout = nn.Dropout(dropout);
        long conv2Out = conv2dOutChannels ?? outCh;
        conv2 = nn.Conv2d(outCh, conv2Out, kernel_size: 3, stride: 1, padding: 1);
        nonlinearity = GetActivation(nonLinearity);

        if (up) upsample = new Upsample2D(inChannels, useConv: false);
        else if (down) downsample = new Downsample2D(inChannels, useConv: false, padding: 1);

        if (useInShortcut ?? inChannels != conv2Out)
            conv_shortcut = nn.Conv2d(inChannels, conv2Out, kernel_size: 1, stride: 1, padding: 0L, bias: convShortcutBias);

        RegisterComponents();
    }

    public override Tensor forward(Tensor input_tensor, Tensor? temb)
    {
        using var scope = NewDisposeScope();
        var hidden_states = nonlinearity.call(norm1.call(input_tensor));

        if (upsample is not null)
        {
            input_tensor = upsample.call(input_tensor);
            hidden_states = upsample.call(hidden_states);
        }
        else if (downsample is not null)
        {
            input_tensor = downsample.call(input_tensor);
            hidden_states = downsample.call(hidden_states);
        }

        hidden_states = conv1.call(hidden_states);

        if (time_emb_proj is not null && temb is not null)
        {
            if (!SkipTimeAct) temb = nonlinearity.call(temb);
            temb = time_emb_proj.call(temb)[TensorIndex.Colon, TensorIndex.Colon, TensorIndex.None, TensorIndex.None];
        }

        if (TimeEmbeddingNorm == "scale_shift")
        {
            if (temb is null) throw new ArgumentNullException(nameof(temb), "temb is required when time_embedding_norm is scale_shift");
            var chunks = temb.chunk(2, dim: 1);
            hidden_states = norm2.call(hidden_states) * (1 + chunks[0]) + chunks[1];
        }
        else
        {
            if (TimeEmbeddingNorm == "default" && temb is not null)
                hidden_states = hidden_states + temb;
            hidden_states = norm2.call(hidden_states);
        }

        hidden_states = nonlinearity.call(hidden_states);
        hidden_states = dropout.call(hidden_states);
        hidden_states = conv2.call(hidden_states);

        if (conv_shortcut is not null) input_tensor = conv_shortcut.call(input_tensor);

        var output = (input_tensor + hidden_states) / OutputScaleFactor;
        return output.MoveToOuterDisposeScope();
    }

    /// <summary>diffusers models/activations.get_activation for the names its configs use.</summary>
    internal static nn.Module<Tensor, Tensor> GetActivation(string name) => name.ToLowerInvariant() switch
    {
        "swish" or "silu" => nn.SiLU(),
        "mish" => nn.Mish(),
        "gelu" => nn.GELU(),
        "relu" => nn.ReLU(),
        _ => throw new NotSupportedException($"activation function '{name}' is not supported (swish, silu, mish, gelu, relu)"),
    };
}
