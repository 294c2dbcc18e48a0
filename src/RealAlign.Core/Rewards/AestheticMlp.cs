using RealAlign.Core.IO;
using RealAlign.Core.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Rewards;

/// <summary>
/// The LAION improved-aesthetic-predictor head (christophschuhmann/improved-aesthetic-predictor
/// <c>simple_inference.py</c>, class <c>MLP</c>): <c>layers = Sequential(Linear(d, 1024), Dropout(0.2),
/// Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))</c>.
/// No activations (upstream comments the ReLUs out), so at inference it is one affine map. The
/// numbered container keeps the released checkpoint's keys (<c>layers.0/2/4/6/7.{weight,bias}</c>,
/// e.g. <c>sac+logos+ava1-l14-linearMSE.pth</c> converted to safetensors).
/// Input: the L2-normalised CLIP ViT-L/14 image embedding (see <see cref="NormalizeEmbeddings"/>).
/// </summary>
public sealed class AestheticMlp : nn.Module<Tensor, Tensor>
{
    public ModuleList<nn.Module<Tensor, Tensor>> layers;

    public int InputSize { get; }

    public AestheticMlp(int inputSize = 768) : base("MLP")
    {
        InputSize = inputSize;
        layers = new ModuleList<nn.Module<Tensor, Tensor>>(
            new LoRACompatibleLinear(inputSize, 1024),
            nn.Dropout(0.2),
            new LoRACompatibleLinear(1024, 128),
            nn.Dropout(0.2),
            new LoRACompatibleLinear(128, 64),
            nn.Dropout(0.1),
            new LoRACompatibleLinear(64, 16),
            new LoRACompatibleLinear(16, 1));
        RegisterComponents();
    }

    /// <summary>
    /// Loads the head from a safetensors file with the original keys, or from a folder holding
    /// <c>model.safetensors</c>; the input size comes from <c>layers.0.weight</c>. Returns it in eval mode.
    /// </summary>
    public static AestheticMlp FromPretrained(string path, Device? device = null, ScalarType dtype = ScalarType.Float32)
    {
        if (Directory.Exists(path)) path = Path.Combine(path, "model.safetensors");
        if (!File.Exists(path)) throw new FileNotFoundException($"aesthetic predictor weights not found: {path}");
        using var ck = SafeTensorsCheckpoint.Open(path);
        if (!ck.Contains("layers.0.weight"))
            throw new CheckpointMismatchException($"{path}: no 'layers.0.weight'; expected the improved-aesthetic-predictor MLP keys layers.0/2/4/6/7");
        var model = new AestheticMlp((int)ck.Info("layers.0.weight").Shape[1]);
        ModelLoading.LoadStateDict(model, ck, strict: true);
        if (dtype != ScalarType.Float32) model.to(dtype);
        if (device is not null) model.to(device);
        model.eval();
        LinearHooks.AssignPaths(model);
        return model;
    }

    /// <param name="x">[N, input_size] normalised embeddings</param>
    /// <returns>[N, 1] predicted aesthetic ratings</returns>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        foreach (var layer in layers) x = layer.forward(x);
        return x.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Upstream's numpy <c>normalized(a)</c>: divide by the L2 norm over the last axis, leaving a
    /// zero-norm row unchanged (its norm is replaced by 1).
    /// </summary>
    public static Tensor NormalizeEmbeddings(Tensor embeddings)
    {
        using var scope = NewDisposeScope();
        var norm = embeddings.norm(-1, keepdim: true);
        norm = torch.where(norm.eq(0), torch.ones_like(norm), norm);
        return (embeddings / norm).MoveToOuterDisposeScope();
    }
}
