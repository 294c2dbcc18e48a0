using RealAlign.Core.Lora;
using RealAlign.Core.Models;
using TorchSharp;
using static TorchSharp.torch;
using static RealAlign.Tests.Lora.LoraTestUtil;

namespace RealAlign.Tests.Lora;

public class LoraHookTests
{
    private static (TinyModel Model, LoraTargetSet Targets) Model()
    {
        torch.manual_seed(11);
        var m = new TinyModel(6, 8, 2);
        return (m, LoraTargetSet.FromModule(m, "tiny"));
    }

    [Fact]
    public void SingleLayerMatchesManualLoraFormula()
    {
        using var _ = no_grad();
        var lin = new LoRACompatibleLinear(5, 7) { Path = "blocks.0.to_q" };
        var targets = new LoraTargetSet("tiny", new Dictionary<string, (long, long)> { ["blocks.0.to_q"] = (5, 7) });
        using var w = LoraWeights.CreateRandom(targets, ["blocks.0.to_q"], rank: 3, alpha: 6, seed: 5);
        var x = randn(2, 4, 5, generator: new Generator(9));
        var m = w.Modules["blocks.0.to_q"];
        var expected = x.matmul(lin.weight.t()) + lin.bias! + (x.matmul(m.A.t()).matmul(m.B.t())) * (6.0 / 3 * 0.7);
        using var hook = new LoraHook(w, 0.7);
        Tensor got;
        using (LinearHooks.Use(hook)) got = lin.forward(x);
        Assert.True(got.allclose(expected, 1e-5, 1e-6));
        Assert.Null(LinearHooks.Current);
        Assert.True(lin.forward(x).allclose(x.matmul(lin.weight.t()) + lin.bias!, 1e-6, 1e-6));
    }

    [Fact]
    public void WholeModelWithAndWithoutHook()
    {
        using var _ = no_grad();
        var (model, targets) = Model();
        var paths = targets.Linears.Keys.Where(p => p.Contains("to_")).ToList();
        using var w = LoraWeights.CreateRandom(targets, paths, rank: 2, alpha: 4, seed: 1);
        var x = randn(3, 5, 6, generator: new Generator(2));
        var baseOut = model.forward(x);
        using var hook = new LoraHook(w, 1.0);
        Tensor adapted;
        using (LinearHooks.Use(hook)) adapted = model.forward(x);
        Assert.False(adapted.allclose(baseOut, 1e-3, 1e-3));
        using var zero = new LoraHook(w, 0.0);
        using (LinearHooks.Use(zero)) Assert.True(LoraTestUtil.BitEqual(model.forward(x), baseOut));
        // Manual: the same model with merged weights gives the same output.
        using (LoraMerge.Merge(model, w, 1.0)) Assert.True(model.forward(x).allclose(adapted, 1e-5, 1e-5));
        Assert.True(LoraTestUtil.BitEqual(model.forward(x), baseOut));
    }

    [Fact]
    public void MixedBatchRowsEachGetTheirAdapters()
    {
        using var _ = no_grad();
        var (model, targets) = Model();
        var all = targets.Linears.Keys.ToList();
        using var w1 = LoraWeights.CreateRandom(targets, all.Where(p => p.Contains("to_q") || p.Contains("to_out")), 3, 3, seed: 21);
        using var w2 = LoraWeights.CreateRandom(targets, all.Where(p => p.Contains("to_k") || p == "proj_in"), 2, 8, seed: 22);
        var x = randn(4, 5, 6, generator: new Generator(3));
        // Row 0: none; row 1: w1 @ 1.0; row 2: w2 @ 0.5; row 3: w1 @ 0.3 + w2 @ -1.
        var rows = new (double S1, double S2)[] { (0, 0), (1.0, 0), (0, 0.5), (0.3, -1) };
        using var mixed = new LoraHook([
            new LoraHookAdapter(w1, rows.Select(r => r.S1).ToArray()),
            new LoraHookAdapter(w2, rows.Select(r => r.S2).ToArray())]);
        Tensor got;
        using (LinearHooks.Use(mixed)) got = model.forward(x);
        for (int i = 0; i < rows.Length; i++)
        {
            using var single = new LoraHook([LoraHookAdapter.AllRows(w1, rows[i].S1), LoraHookAdapter.AllRows(w2, rows[i].S2)]);
            Tensor one;
            using (LinearHooks.Use(single)) one = model.forward(x[i].unsqueeze(0));
            Assert.True(got[i].unsqueeze(0).allclose(one, 1e-5, 1e-6), $"row {i}");
        }
        // Classifier-free guidance doubles the batch: scales repeat over each half.
        var doubled = cat([x, x]);
        Tensor cfg;
        using (LinearHooks.Use(mixed)) cfg = model.forward(doubled);
        Assert.True(cfg[TensorIndex.Slice(0, 4)].allclose(got, 1e-5, 1e-6));
        Assert.True(cfg[TensorIndex.Slice(4, 8)].allclose(got, 1e-5, 1e-6));
        using (LinearHooks.Use(mixed))
            Assert.Throws<InvalidOperationException>(() => model.forward(x[TensorIndex.Slice(0, 3)]));
    }

    [Fact]
    public void ScopedHookLeavesOtherModelsAlone()
    {
        using var _ = no_grad();
        var (a, targets) = Model();
        var (b, _) = Model(); // same paths, other instances (like a text encoder beside the transformer)
        using var w = LoraWeights.CreateRandom(targets, targets.Linears.Keys, 2, 2, seed: 6);
        var x = randn(2, 3, 6);
        var baseA = a.forward(x);
        var baseB = b.forward(x);
        using var hook = new LoraHook(w, 1.0, scope: targets);
        using (LinearHooks.Use(hook))
        {
            Assert.False(a.forward(x).allclose(baseA, 1e-4, 1e-4));
            Assert.True(LoraTestUtil.BitEqual(b.forward(x), baseB));
        }
    }

    [Fact]
    public void DeviceCopiesAreMadeOncePerDtype()
    {
        using var _ = no_grad();
        var (model, targets) = Model();
        using var w = LoraWeights.CreateRandom(targets, targets.Linears.Keys, 2, 2, seed: 4);
        var (a1, _) = w.DeviceCopy("proj_in", CPU, ScalarType.Float32);
        Assert.Same(w.Modules["proj_in"].A, a1);
        var (a2, _) = w.DeviceCopy("proj_in", CPU, ScalarType.Float64);
        var (a3, _) = w.DeviceCopy("proj_in", CPU, ScalarType.Float64);
        Assert.Same(a2, a3);
        Assert.Equal(ScalarType.Float64, a2.dtype);
        // A float64 model uses the float64 copies.
        model.to(ScalarType.Float64);
        var x = randn(2, 3, 6, dtype: ScalarType.Float64);
        using var hook = new LoraHook(w);
        using (LinearHooks.Use(hook)) Assert.Equal(ScalarType.Float64, model.forward(x).dtype);
    }
}

public class LoraMergeTests
{
    [Fact]
    public void UnmergeRestoresBaseWeightsBitExactly()
    {
        using var _ = no_grad();
        torch.manual_seed(5);
        var model = new TinyModel(6, 8, 3);
        var targets = LoraTargetSet.FromModule(model, "tiny");
        var before = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        using var w = LoraWeights.CreateRandom(targets, targets.Linears.Keys, 4, 16, seed: 8, scaleB: 3);
        var x = randn(2, 3, 6);
        Tensor viaHook;
        using (var hook = new LoraHook(w, 0.8))
        using (LinearHooks.Use(hook)) viaHook = model.forward(x);
        var merged = LoraMerge.Merge(model, w, 0.8);
        Assert.True(merged.IsMerged);
        var mergedOut = model.forward(x);
        double rel = ((mergedOut - viaHook).norm() / viaHook.norm()).item<float>();
        Assert.True(rel < 1e-5, $"merged vs hook: relative L2 {rel}");
        Assert.Contains(model.state_dict(), kv => !BitEqual(kv.Value, before[kv.Key]));

        // Subtracting the delta does not give W back in float (why Unmerge restores a copy instead).
        var m = w.Modules["blocks.0.to_q"];
        var wq = model.blocks[0].to_q.weight;
        var subtracted = wq - m.B.matmul(m.A) * (w.Scaling(m.Path) * 0.8);
        Assert.False(BitEqual(subtracted, before["blocks.0.to_q.weight"]));

        merged.Unmerge();
        Assert.False(merged.IsMerged);
        foreach (var (k, v) in model.state_dict()) Assert.True(BitEqual(v, before[k]), k);
        merged.Unmerge(); // idempotent
    }

    [Fact]
    public void MergeRefusesAdaptersForOtherModels()
    {
        var model = new TinyModel(6, 8, 1);
        var other = new LoraTargetSet("x", new Dictionary<string, (long, long)> { ["blocks.5.to_q"] = (8, 8) });
        using var w = LoraWeights.CreateRandom(other, ["blocks.5.to_q"], 2, 2, seed: 1);
        Assert.Throws<LoraFormatException>(() => LoraMerge.Merge(model, w));
    }
}
