using RealAlign.Core.IO;
using RealAlign.Core.Models.Autoencoders;
using RealAlign.Core.Models.Clip;
using RealAlign.Core.Models.Transformers;
using RealAlign.Core.Schedulers;
using RealAlign.Core.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Pipelines;

/// <summary>
/// The embedded default backbone: an SD3.5-shaped pipeline (dual attention, RMS qk-norm, two CLIP
/// encoders with the real 49,408-token vocabulary, 16-channel VAE, shift-3 flow matching) small
/// enough to run the whole product on a laptop CPU. Weights are a deterministic random init from
/// fixed seeds, so every server start serves the same function of (prompt, x_T).
/// </summary>
public static class TinySd3
{
    public const string Name = "tiny-sd3";

    public static SD3Transformer2DModelConfig TransformerConfig { get; } = new()
    {
        SampleSize = 32, PatchSize = 2, InChannels = 16, OutChannels = 16, NumLayers = 2,
        AttentionHeadDim = 16, NumAttentionHeads = 4, JointAttentionDim = 128, CaptionProjectionDim = 64,
        PooledProjectionDim = 64, PosEmbedMaxSize = 64, DualAttentionLayers = [0], QkNorm = "rms_norm",
    };

    public static AutoencoderKLConfig VaeConfig { get; } = new()
    {
        InChannels = 3, OutChannels = 3,
        DownBlockTypes = ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        UpBlockTypes = ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        BlockOutChannels = [32, 64], LayersPerBlock = 1, LatentChannels = 16, NormNumGroups = 32,
        ScalingFactor = 1.5305, ShiftFactor = 0.0609, UseQuantConv = false, UsePostQuantConv = false,
    };

    private static CLIPTextConfig ClipConfig(bool clipL) => new()
    {
        VocabSize = 49408, HiddenSize = 32, IntermediateSize = 37, ProjectionDim = 32, NumHiddenLayers = 2,
        NumAttentionHeads = 4, MaxPositionEmbeddings = 77,
        // CLIP-L keeps the legacy eos id 2 (argmax pooling) and quick_gelu; CLIP-G pools at the first eos with gelu.
        HiddenAct = clipL ? "quick_gelu" : "gelu", EosTokenId = clipL ? 2 : 49407, BosTokenId = clipL ? 0 : 49406,
    };

    public static FlowMatchEulerDiscreteSchedulerConfig SchedulerConfig { get; } = new() { Shift = 3.0 };

    public static StableDiffusion3Pipeline Create(Device? device = null, ScalarType dtype = ScalarType.Float32)
    {
        device ??= CPU;
        var transformer = new SD3Transformer2DModel(TransformerConfig);
        var vae = new AutoencoderKL(VaeConfig);
        var te1 = new CLIPTextModelWithProjection(ClipConfig(clipL: true));
        var te2 = new CLIPTextModelWithProjection(ClipConfig(clipL: false));
        ModelLoading.DeterministicInit(transformer, seed: 1);
        ModelLoading.DeterministicInit(vae, seed: 2);
        ModelLoading.DeterministicInit(te1, seed: 3);
        ModelLoading.DeterministicInit(te2, seed: 4);
        transformer.to(dtype); transformer.to(device);
        vae.to(dtype); vae.to(device);
        te1.to(dtype); te1.to(device);
        te2.to(dtype); te2.to(device);
        return new StableDiffusion3Pipeline(transformer, vae, te1, te2,
            ClipTokenizer.Embedded(padWithExclamation: false), ClipTokenizer.Embedded(padWithExclamation: true),
            SchedulerConfig, device, dtype);
    }
}
