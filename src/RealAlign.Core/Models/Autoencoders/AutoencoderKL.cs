using System.Text.Json;
using System.Text.Json.Serialization;
using RealAlign.Core.IO;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models.Autoencoders;

/// <summary>config.json of diffusers' AutoencoderKL (defaults as upstream's constructor).</summary>
public sealed record AutoencoderKLConfig
{
    [JsonPropertyName("in_channels")] public int InChannels { get; init; } = 3;
    [JsonPropertyName("out_channels")] public int OutChannels { get; init; } = 3;
    [JsonPropertyName("down_block_types")] public string[] DownBlockTypes { get; init; } = ["DownEncoderBlock2D"];
    [JsonPropertyName("up_block_types")] public string[] UpBlockTypes { get; init; } = ["UpDecoderBlock2D"];
    [JsonPropertyName("block_out_channels")] public int[] BlockOutChannels { get; init; } = [64];
    [JsonPropertyName("layers_per_block")] public int LayersPerBlock { get; init; } = 1;
    [JsonPropertyName("act_fn")] public string ActFn { get; init; } = "silu";
    [JsonPropertyName("latent_channels")] public int LatentChannels { get; init; } = 4;
    [JsonPropertyName("norm_num_groups")] public int NormNumGroups { get; init; } = 32;

    /// <summary>Tile size for tiled encode/decode upstream; an int or an [H, W] pair in config.json.</summary>
    [JsonPropertyName("sample_size"), JsonConverter(typeof(IntOrIntArrayConverter))]
    public int[] SampleSize { get; init; } = [32];

    [JsonPropertyName("scaling_factor")] public double ScalingFactor { get; init; } = 0.18215;
    [JsonPropertyName("shift_factor")] public double? ShiftFactor { get; init; }
    [JsonPropertyName("latents_mean")] public double[]? LatentsMean { get; init; }
    [JsonPropertyName("latents_std")] public double[]? LatentsStd { get; init; }
    [JsonPropertyName("force_upcast")] public bool ForceUpcast { get; init; } = true;
    [JsonPropertyName("use_quant_conv")] public bool UseQuantConv { get; init; } = true;
    [JsonPropertyName("use_post_quant_conv")] public bool UsePostQuantConv { get; init; } = true;
    [JsonPropertyName("mid_block_add_attention")] public bool MidBlockAddAttention { get; init; } = true;

    /// <summary>Reads <c>sample_size</c> given either as a number or as a list of numbers.</summary>
    public sealed class IntOrIntArrayConverter : JsonConverter<int[]>
    {
        public override int[] Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options) =>
            reader.TokenType switch
            {
                JsonTokenType.Number => [reader.GetInt32()],
                JsonTokenType.StartArray => JsonSerializer.Deserialize<int[]>(ref reader, options) ?? [],
                _ => throw new JsonException($"sample_size: expected a number or an array, got {reader.TokenType}"),
            };

        public override void Write(Utf8JsonWriter writer, int[] value, JsonSerializerOptions options)
        {
            if (value.Length == 1) writer.WriteNumberValue(value[0]);
            else JsonSerializer.Serialize(writer, value, options);
        }
    }
}

/// <summary>
/// diffusers <c>AutoencoderKL</c> (models/autoencoders/autoencoder_kl.py, 0.32.2): the KL VAE of
/// SD1.x/SDXL (4 latent channels, quant convs) and SD3/SD3.5/FLUX (16 channels, no quant convs).
/// Parameter names are the checkpoint keys. Encode/decode are raw: pipelines apply
/// <c>(z − shift)·scale</c> after encoding and <c>z/scale + shift</c> before decoding
/// (<see cref="ToModelLatents"/> / <see cref="FromModelLatents"/>). Tiling and slicing are not implemented.
/// </summary>
public sealed class AutoencoderKL : nn.Module<Tensor, Tensor>
{
    private readonly Encoder encoder;
    private readonly Decoder decoder;
    private readonly Conv2d? quant_conv;
    private readonly Conv2d? post_quant_conv;

    public AutoencoderKLConfig Config { get; }

    public double ScalingFactor => Config.ScalingFactor;

    /// <summary>The config's shift_factor, 0 when it is null (SD1.x).</summary>
    public double ShiftFactor => Config.ShiftFactor ?? 0.0;

    public int LatentChannels => Config.LatentChannels;

    /// <summary>Spatial down-sampling factor of the latents, 2^(len(block_out_channels) − 1) (the pipelines' vae_scale_factor).</summary>
    public int ScaleFactor => 1 << (Config.BlockOutChannels.Length - 1);

    public AutoencoderKL(AutoencoderKLConfig config) : base(nameof(AutoencoderKL))
    {
        Config = config;
        var blockOut = config.BlockOutChannels.Select(c => (long)c).ToArray();
        encoder = new Encoder(config.InChannels, config.LatentChannels, config.DownBlockTypes, blockOut,
            config.LayersPerBlock, config.NormNumGroups, config.ActFn, doubleZ: true, config.MidBlockAddAttention);
        decoder = new Decoder(config.LatentChannels, config.OutChannels, config.UpBlockTypes, blockOut,
            config.LayersPerBlock, config.NormNumGroups, config.ActFn, normType: "group", config.MidBlockAddAttention);
        if (config.UseQuantConv) quant_conv = nn.Conv2d(2 * config.LatentChannels, 2 * config.LatentChannels, kernel_size: 1);
        if (config.UsePostQuantConv) post_quant_conv = nn.Conv2d(config.LatentChannels, config.LatentChannels, kernel_size: 1);
        RegisterComponents();
    }

    /// <summary>
    /// Builds the model from <c>folder/config.json</c> and loads <c>diffusion_pytorch_model*.safetensors</c>
    /// strictly (every key must match by name and shape), then moves it to <paramref name="device"/> and
    /// <paramref name="dtype"/>. The module is left in eval mode.
    /// </summary>
    public static AutoencoderKL FromPretrained(string folder, Device? device = null, ScalarType dtype = ScalarType.Float32)
    {
        var config = ModelLoading.ReadConfig<AutoencoderKLConfig>(Path.Combine(folder, "config.json"));
        var model = new AutoencoderKL(config);
        try
        {
            using (var checkpoint = SafeTensorsCheckpoint.OpenFolder(folder, "diffusion_pytorch_model"))
                ModelLoading.LoadStateDict(model, checkpoint, strict: true);
            if (dtype != ScalarType.Float32) model.to(dtype);
            if (device is not null) model.to(device);
            model.eval();
            LinearHooks.AssignPaths(model);
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>Encoder output after quant_conv: [B, 2·latent_channels, H/f, W/f] (mean ‖ logvar).</summary>
    public Tensor EncodeRaw(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = encoder.call(x);
        if (quant_conv is not null) h = quant_conv.call(h);
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>The posterior (upstream <c>encode(x).latent_dist</c>); dispose it after use.</summary>
    public DiagonalGaussianDistribution Encode(Tensor x)
    {
        using var h = EncodeRaw(x);
        return new DiagonalGaussianDistribution(h);
    }

    /// <summary>
    /// Posterior mean and logvar (clamped to [−30, 20] as upstream); std = exp(0.5·logvar).
    /// </summary>
    public (Tensor mean, Tensor logvar) EncodeMoments(Tensor x)
    {
        using var scope = NewDisposeScope();
        var chunks = EncodeRaw(x).chunk(2, dim: 1);
        var mean = chunks[0];
        var logvar = chunks[1].clamp(-30.0, 20.0);
        scope.MoveToOuter(mean, logvar);
        return (mean, logvar);
    }

    /// <summary>Raw decoder output (post_quant_conv first when present); no scaling or shift applied.</summary>
    public Tensor Decode(Tensor z)
    {
        using var scope = NewDisposeScope();
        if (post_quant_conv is not null) z = post_quant_conv.call(z);
        return decoder.call(z).MoveToOuterDisposeScope();
    }

    /// <summary>Raw VAE latent → the diffusion model's latent space: (z − shift_factor)·scaling_factor.</summary>
    public Tensor ToModelLatents(Tensor z) => (z - ShiftFactor) * ScalingFactor;

    /// <summary>Diffusion-model latent → raw VAE latent for <see cref="Decode"/>: latents/scaling_factor + shift_factor.</summary>
    public Tensor FromModelLatents(Tensor latents) => latents / ScalingFactor + ShiftFactor;

    /// <summary>Upstream <c>forward(sample)</c> without sampling: decode(mode of the posterior).</summary>
    public override Tensor forward(Tensor sample)
    {
        using var scope = NewDisposeScope();
        var (mean, _) = EncodeMoments(sample);
        return Decode(mean).MoveToOuterDisposeScope();
    }
}
