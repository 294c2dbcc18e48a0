using TorchSharp;
using RealAlign.Core.Imaging;
using RealAlign.Core.IO;
using RealAlign.Core.Models.Clip;
using RealAlign.Core.Text;
using static TorchSharp.torch;

namespace RealAlign.Core.Rewards;

/// <summary>
/// The embedded default CLIP reward model, so a server without <c>--reward</c> scores out of the box:
/// a tiny CLIPModel (2 layers, width 32, 32×32 images in 8×8 patches) with a deterministic random
/// init, the real CLIP vocabulary (<see cref="ClipTokenizer.Embedded"/>) and CLIPImageProcessor's
/// defaults at 32 px. Its numbers are stable but meaningless; it exists for wiring, tests and benches.
/// </summary>
public static class TinyClipReward
{
    public const int ImageSize = 32;

    public static readonly CLIPConfig Config = new()
    {
        ProjectionDim = 32,
        TextConfig = new CLIPTextConfig
        {
            HiddenSize = 32, IntermediateSize = 64, NumHiddenLayers = 2, NumAttentionHeads = 4, ProjectionDim = 32,
            EosTokenId = 2, // legacy rule: pool at argmax(input_ids), i.e. the first <|endoftext|>
        },
        VisionConfig = new CLIPVisionConfig
        {
            HiddenSize = 32, IntermediateSize = 64, NumHiddenLayers = 2, NumAttentionHeads = 4, ProjectionDim = 32,
            ImageSize = ImageSize, PatchSize = 8,
        },
    };

    public static ClipRewardModel Create(Device device)
    {
        var model = new CLIPModel(Config);
        ModelLoading.DeterministicInit(model, seed: 11);
        using (no_grad()) model.logit_scale.fill_(Math.Log(100.0)); // PickScore's trained value (clamped max of CLIP)
        model.to(device);
        model.eval();
        var processor = new ClipImageProcessor(new ClipImageProcessorConfig { ShortestEdge = ImageSize, CropHeight = ImageSize, CropWidth = ImageSize });
        return new ClipRewardModel(model, ClipTokenizer.Embedded(), processor, device);
    }
}
