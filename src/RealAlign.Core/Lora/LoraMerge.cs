using RealAlign.Core.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Lora;

/// <summary>
/// Folds one adapter into the base weights (<c>W += scale · scaling · B @ A</c>, peft
/// lora.Linear.merge / diffusers fuse_lora) so a single-adapter deployment pays no per-step LoRA
/// cost, and unfolds it exactly.
///
/// Unmerge restores a saved copy of each original weight instead of subtracting the delta: in
/// floating point <c>(W + Δ) − Δ</c> is not W, because the sum is rounded to W's precision (the bits
/// of W below ulp(W + Δ) are lost, and the rounding depends on Δ's magnitude), so peft's
/// subtracting unmerge drifts by a few ulps per merge/unmerge cycle. The copy costs one weight's
/// memory per adapted layer while merged.
///
/// Merging changes the model for every caller: do it only where no other request runs on the model
/// (the server serves adapters unmerged through <see cref="LoraHook"/>).
/// </summary>
public static class LoraMerge
{
    public static MergedLora Merge(nn.Module model, LoraWeights weights, double scale = 1.0)
    {
        if (!double.IsFinite(scale)) throw new ArgumentException($"scale {scale} is not finite");
        var linears = new Dictionary<string, LoRACompatibleLinear>(StringComparer.Ordinal);
        foreach (var (name, m) in model.named_modules())
            if (m is LoRACompatibleLinear l) linears[name] = l;
        var missing = weights.Modules.Keys.Where(p => !linears.ContainsKey(p)).ToList();
        if (missing.Count > 0)
            throw new LoraFormatException($"cannot merge: the model has no linear layer at {string.Join(", ", missing.Take(10))}");
        foreach (var m in weights.Modules.Values)
        {
            var l = linears[m.Path];
            if (l.InFeatures != m.InFeatures || l.OutFeatures != m.OutFeatures)
                throw new LoraFormatException($"cannot merge '{m.Path}': adapter is [{m.OutFeatures}x{m.InFeatures}], layer is [{l.OutFeatures}x{l.InFeatures}]");
        }

        var saved = new List<(LoRACompatibleLinear Layer, Tensor Original)>();
        using var _ = no_grad();
        try
        {
            foreach (var m in weights.Modules.Values.OrderBy(m => m.Path, StringComparer.Ordinal))
            {
                var w = linears[m.Path].weight;
                using var scope = NewDisposeScope();
                saved.Add((linears[m.Path], w.detach().clone().MoveToOuterDisposeScope().DetachFromDisposeScope()));
                var b = m.B.to(w.dtype, w.device);
                var a = m.A.to(w.dtype, w.device);
                // peft get_delta_weight: (B @ A) * scaling, in the weight's dtype.
                w.add_(b.matmul(a).mul(m.Scaling(weights.UseRsLora) * scale));
            }
        }
        catch
        {
            foreach (var (layer, orig) in saved) { layer.weight.copy_(orig); orig.Dispose(); }
            throw;
        }
        return new MergedLora(saved);
    }
}

/// <summary>A merge in effect; <see cref="Unmerge"/> (or Dispose) puts the original weights back bit for bit.</summary>
public sealed class MergedLora : IDisposable
{
    private List<(LoRACompatibleLinear Layer, Tensor Original)>? _saved;

    internal MergedLora(List<(LoRACompatibleLinear, Tensor)> saved) => _saved = saved;

    public bool IsMerged => _saved is not null;

    public void Unmerge()
    {
        var saved = Interlocked.Exchange(ref _saved, null);
        if (saved is null) return;
        using var _ = no_grad();
        foreach (var (layer, orig) in saved)
        {
            layer.weight.copy_(orig);
            orig.Dispose();
        }
    }

    public void Dispose() => Unmerge();
}
