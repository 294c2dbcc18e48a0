using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models;

/// <summary>
/// Something that adds to a linear layer's output for the current forward pass: LoRA adapters at
/// serving time (per-request, per-row) and trainable LoRA during fine-tuning. Installed per thread
/// by the executor (see <see cref="LinearHooks"/>), so the model code stays free of adapter logic.
/// </summary>
public interface ILinearHook
{
    /// <summary>Returns the layer output given its input and the base output (may return <paramref name="y"/>).</summary>
    Tensor Apply(LoRACompatibleLinear layer, Tensor x, Tensor y);
}

/// <summary>Thread-local hook slot: the executor thread that runs a forward pass owns it.</summary>
public static class LinearHooks
{
    [ThreadStatic] private static ILinearHook? _current;
    public static ILinearHook? Current => _current;

    /// <summary>Installs a hook for the current thread until the returned scope is disposed.</summary>
    public static IDisposable Use(ILinearHook? hook)
    {
        var prev = _current;
        _current = hook;
        return new Restore(prev);
    }

    private sealed class Restore(ILinearHook? prev) : IDisposable
    {
        public void Dispose() => _current = prev;
    }

    /// <summary>
    /// Gives every <see cref="LoRACompatibleLinear"/> its state-dict path (e.g.
    /// <c>transformer_blocks.0.attn.to_q</c>), which adapters use as their target name.
    /// </summary>
    public static void AssignPaths(nn.Module root)
    {
        foreach (var (name, m) in root.named_modules())
            if (m is LoRACompatibleLinear l) l.Path = name;
    }
}

/// <summary>
/// nn.Linear with the same parameters (<c>weight</c> [out,in], <c>bias</c> [out]) plus a hook point
/// for adapters (diffusers had a class of this name for the same purpose). Every Linear that LoRA
/// may target is one of these.
/// </summary>
public sealed class LoRACompatibleLinear : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    public Parameter? bias;

    public long InFeatures { get; }
    public long OutFeatures { get; }

    /// <summary>Module path within its model (set by <see cref="LinearHooks.AssignPaths"/>).</summary>
    public string Path { get; set; } = "";

    public LoRACompatibleLinear(long inFeatures, long outFeatures, bool hasBias = true) : base("Linear")
    {
        InFeatures = inFeatures;
        OutFeatures = outFeatures;
        // Same default init as torch.nn.Linear (kaiming-uniform weight, uniform bias).
        var lin = nn.Linear(inFeatures, outFeatures, hasBias);
        weight = new Parameter(lin.weight!.detach().clone());
        bias = hasBias ? new Parameter(lin.bias!.detach().clone()) : null;
        lin.Dispose();
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        var y = nn.functional.linear(x, weight, bias);
        var hook = LinearHooks.Current;
        return hook is null ? y : hook.Apply(this, x, y);
    }
}
