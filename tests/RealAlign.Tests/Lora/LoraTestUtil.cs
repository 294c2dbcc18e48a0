using RealAlign.Core.IO;
using RealAlign.Core.Lora;
using RealAlign.Core.Models;
using RealAlign.Tests.Infrastructure;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Tests.Lora;

internal static class LoraTestUtil
{
    /// <summary>
    /// The linear layers of a diffusers model folder read from its checkpoint (every 2-D
    /// <c>*.weight</c>), for validating adapters without building the model.
    /// </summary>
    public static LoraTargetSet TargetsFromCheckpoint(string modelFolder, string family)
    {
        using var ck = SafeTensorsCheckpoint.OpenFolder(modelFolder, "diffusion_pytorch_model");
        var d = new Dictionary<string, (long, long)>(StringComparer.Ordinal);
        foreach (var k in ck.Keys)
        {
            var info = ck.Info(k);
            if (k.EndsWith(".weight", StringComparison.Ordinal) && info.Shape.Length == 2)
                d[k[..^".weight".Length]] = (info.Shape[1], info.Shape[0]);
        }
        return new LoraTargetSet(family, d);
    }

    public static GoldenCase LoraCase() => Fixtures.Case("sd3_lora");

    public static string BaseModelDir(GoldenCase c) =>
        Path.GetFullPath(Path.Combine(c.Dir, c.Json["base_model_dir"]!.ToString()));

    public static LoraTargetSet Sd3Targets(GoldenCase c) => TargetsFromCheckpoint(BaseModelDir(c), "sd3");

    public static string TempDir()
    {
        var d = Path.Combine(Path.GetTempPath(), "realalign-lora-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(d);
        return d;
    }

    public static bool BitEqual(Tensor a, Tensor b) =>
        a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.bytes.SequenceEqual(b.bytes);
}

/// <summary>A tiny attention-shaped model whose linears are LoRACompatibleLinear, for hook and merge tests.</summary>
internal sealed class TinyBlock : nn.Module<Tensor, Tensor>
{
    public LoRACompatibleLinear to_q;
    public LoRACompatibleLinear to_k;
    public ModuleList<LoRACompatibleLinear> to_out;

    public TinyBlock(long dim) : base("TinyBlock")
    {
        to_q = new LoRACompatibleLinear(dim, dim);
        to_k = new LoRACompatibleLinear(dim, dim, hasBias: false);
        to_out = new ModuleList<LoRACompatibleLinear>(new LoRACompatibleLinear(dim, dim + 2));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = to_q.forward(x).tanh() + to_k.forward(x);
        return to_out[0].forward(h).MoveToOuterDisposeScope();
    }
}

internal sealed class TinyModel : nn.Module<Tensor, Tensor>
{
    public ModuleList<TinyBlock> blocks;
    public LoRACompatibleLinear proj_in;

    public TinyModel(long inDim, long dim, int nBlocks) : base("TinyModel")
    {
        proj_in = new LoRACompatibleLinear(inDim, dim);
        blocks = new ModuleList<TinyBlock>();
        for (int i = 0; i < nBlocks; i++) blocks.Add(new TinyBlock(dim));
        RegisterComponents();
        LinearHooks.AssignPaths(this);
    }

    /// <summary>Blocks are chained through their first <c>dim</c> outputs.</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = proj_in.forward(x);
        foreach (var b in blocks)
        {
            var o = b.forward(h);
            h = h + o[TensorIndex.Ellipsis, TensorIndex.Slice(0, h.shape[^1])];
        }
        return h.MoveToOuterDisposeScope();
    }
}
