using System.Diagnostics;
using RealAlign.Core.IO;
using RealAlign.Core.Lora;
using RealAlign.Core.Models;
using TorchSharp;
using static TorchSharp.torch;
using static RealAlign.Tests.Lora.LoraTestUtil;

namespace RealAlign.Tests.Lora;

public class AdapterRegistryTests : IDisposable
{
    private readonly Infrastructure.GoldenCase _case = LoraCase();
    private readonly string _root = TempDir();
    private readonly LoraTargetSet _targets;

    public AdapterRegistryTests()
    {
        _targets = Sd3Targets(_case);
        // An adapters root laid out like a deployment: both fixture formats, plus a corrupt file.
        CopyDir(_case.PathOf("lora_diffusers"), Path.Combine(_root, "diffusers"));
        CopyDir(_case.PathOf("lora_peft"), Path.Combine(_root, "peft"));
        Directory.CreateDirectory(Path.Combine(_root, "bad"));
        var bytes = File.ReadAllBytes(_case.PathOf("lora_diffusers", LoraFormats.DiffusersWeightName));
        File.WriteAllBytes(Path.Combine(_root, "bad", LoraFormats.DiffusersWeightName), bytes[..(bytes.Length / 2)]);
    }

    public void Dispose()
    {
        _case.Dispose();
        Directory.Delete(_root, true);
    }

    private static void CopyDir(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(from)) File.Copy(f, Path.Combine(to, Path.GetFileName(f)));
    }

    private AdapterRegistry NewRegistry(int maxAdapters = 8, int maxRank = 64)
    {
        var reg = new AdapterRegistry(new AdapterRegistryOptions { AdaptersRoot = _root, MaxAdapters = maxAdapters, MaxRank = maxRank });
        reg.RegisterBackbone(new AdapterBackbone("sd3", _targets));
        return reg;
    }

    [Fact]
    public void LoadListGetUnload()
    {
        using var reg = NewRegistry();
        var a = reg.Load("style", "sd3", "diffusers");
        var b = reg.Load("peft-style", null, "peft/");
        Assert.Equal(1, a.Version);
        Assert.Equal("diffusers", a.Format);
        Assert.Equal("peft", b.Format);
        Assert.Equal(4, a.Rank);
        Assert.Equal(19, a.Targets.Count());
        Assert.Equal(64, a.Sha256.Length);
        Assert.Equal(["peft-style", "style"], reg.List().Select(v => v.Name));
        Assert.Same(a, reg.Get("style"));
        Assert.Null(reg.Get("nope"));
        reg.Unload("style");
        Assert.True(a.IsReleased);
        Assert.Null(reg.Get("style"));
        var ex = Assert.Throws<AdapterException>(() => reg.Unload("style"));
        Assert.Equal(AdapterErrorKind.NotFound, ex.Kind);
        Assert.Equal(AdapterErrorKind.NotFound, Assert.Throws<AdapterException>(() => reg.Load("x", "flux", "peft")).Kind);
        Assert.Equal(AdapterErrorKind.InvalidArgument, Assert.Throws<AdapterException>(() => reg.Load("../x", "sd3", "peft")).Kind);
    }

    [Fact]
    public void HotSwapKeepsRunningRequestsOnTheirVersion()
    {
        using var reg = NewRegistry();
        var v1 = reg.Load("style", "sd3", "diffusers");
        var lease = reg.Acquire(["style"]);
        Assert.Same(v1, lease["style"]);

        var v2 = reg.Load("style", "sd3", "peft");
        Assert.Equal(2, v2.Version);
        Assert.Same(v2, reg.Get("style"));
        Assert.Single(reg.List());
        // The running request still holds v1, whose tensors are alive and unchanged.
        Assert.False(v1.IsReleased);
        Assert.Same(v1, lease["style"]);
        Assert.Equal(4.0, lease["style"].Weights.Modules.Values.First().Alpha);
        using (var next = reg.Acquire(["style"])) Assert.Same(v2, next["style"]);
        lease.Dispose();
        Assert.True(v1.IsReleased);
        Assert.False(v2.IsReleased);

        // Unload while leased: the lease keeps the version until it ends.
        var l2 = reg.Acquire(["style"]);
        reg.Unload("style");
        Assert.False(v2.IsReleased);
        Assert.Equal(AdapterErrorKind.NotFound, Assert.Throws<AdapterException>(() => reg.Acquire(["style"])).Kind);
        l2.Dispose();
        Assert.True(v2.IsReleased);
        // Versions keep counting after an unload.
        Assert.Equal(3, reg.Load("style", "sd3", "diffusers").Version);
    }

    [Fact]
    public void FailedLoadsLeaveTheRegistryUnchanged()
    {
        using var reg = NewRegistry(maxAdapters: 2, maxRank: 64);
        var v1 = reg.Load("style", "sd3", "diffusers");
        Assert.Throws<LoraFormatException>(() => reg.Load("style", "sd3", "bad"));
        Assert.Throws<LoraFormatException>(() => reg.Load("other", "sd3", "bad"));
        Assert.Same(v1, reg.Get("style"));
        Assert.False(v1.IsReleased);
        Assert.Single(reg.List());

        reg.Load("second", "sd3", "peft");
        var full = Assert.Throws<AdapterException>(() => reg.Load("third", "sd3", "peft"));
        Assert.Equal(AdapterErrorKind.ResourceExhausted, full.Kind);
        Assert.Equal(2, reg.Count);
        // Replacing an existing name is allowed at the limit.
        Assert.Equal(2, reg.Load("second", "sd3", "diffusers").Version);

        using var small = NewRegistry(maxRank: 2);
        Assert.Contains(Assert.Throws<LoraFormatException>(() => small.Load("style", "sd3", "diffusers")).Problems, p => p.Contains("exceeds the configured maximum 2"));
        Assert.Equal(0, small.Count);
    }

    [Fact]
    public void LeasesBuildPerRowHooks()
    {
        using var reg = NewRegistry();
        reg.Load("a", "sd3", "diffusers");
        reg.Load("b", "sd3", "peft");
        using var lease = reg.Acquire(["a", "b", "a"]);
        Assert.Equal(2, lease.Versions.Count);
        using var hook = lease.CreateHook([[("a", 1.0)], [], [("a", 0.5), ("b", 2.0)]]);
        Assert.Equal(2, hook.Adapters.Count);
        Assert.Equal(AdapterErrorKind.NotFound, Assert.Throws<AdapterException>(() => reg.Acquire(["a", "zz"])).Kind);
    }

    [Fact]
    public void ConcurrentAcquireAndHotSwapNeverSeeFreedVersions()
    {
        using var reg = NewRegistry();
        reg.Load("style", "sd3", "diffusers");
        using var stop = new CancellationTokenSource();
        var errors = new List<Exception>();
        var readers = Enumerable.Range(0, 3).Select(_ => Task.Run(() =>
        {
            while (!stop.IsCancellationRequested)
            {
                try
                {
                    using var lease = reg.Acquire(["style"]);
                    var v = lease["style"];
                    Assert.False(v.IsReleased);
                    using var s = NewDisposeScope();
                    // Touch the tensors: they must be alive while leased.
                    var sum = v.Weights.Modules.Values.First().A.sum().item<float>();
                    Assert.True(float.IsFinite(sum));
                }
                catch (Exception e) { lock (errors) errors.Add(e); }
            }
        })).ToArray();
        for (int i = 0; i < 30; i++) reg.Load("style", "sd3", i % 2 == 0 ? "peft" : "diffusers");
        stop.Cancel();
        Task.WaitAll(readers);
        Assert.Empty(errors);
        Assert.Equal(31, reg.Get("style")!.Version);
    }

    [Fact]
    public void PathsOutsideTheRootAreRefused()
    {
        var outside = TempDir();
        try
        {
            CopyDir(_case.PathOf("lora_diffusers"), Path.Combine(outside, "evil"));
            File.CreateSymbolicLink(Path.Combine(_root, "link-out"), Path.Combine(outside, "evil"));
            File.CreateSymbolicLink(Path.Combine(_root, "link-in"), Path.Combine(_root, "diffusers"));
            Directory.CreateDirectory(Path.Combine(_root, "sub"));
            File.CreateSymbolicLink(Path.Combine(_root, "sub", "up"), "../..");

            Assert.Equal(Path.Combine(AdapterPaths.RealPath(_root), "diffusers"), AdapterPaths.ResolveUnderRoot(_root, "sub/../diffusers/."));
            Assert.Equal(Path.Combine(AdapterPaths.RealPath(_root), "diffusers"), AdapterPaths.ResolveUnderRoot(_root, "link-in"));
            foreach (var bad in new[] { "../x", "diffusers/../../x", "/etc/passwd", outside, "link-out", "link-out/pytorch_lora_weights.safetensors", "sub/up", "sub/up/" + Path.GetFileName(_root) + "/../x" })
            {
                var ex = Assert.Throws<AdapterException>(() => AdapterPaths.ResolveUnderRoot(_root, bad));
                Assert.Equal(AdapterErrorKind.PermissionDenied, ex.Kind);
            }
            // An absolute path inside the root is fine.
            Assert.EndsWith("peft", AdapterPaths.ResolveUnderRoot(_root, Path.Combine(_root, "peft")));

            using var reg = NewRegistry();
            Assert.Equal(AdapterErrorKind.PermissionDenied, Assert.Throws<AdapterException>(() => reg.Load("x", "sd3", "link-out")).Kind);
            Assert.Equal(AdapterErrorKind.PermissionDenied, Assert.Throws<AdapterException>(() => reg.Load("x", "sd3", "../" + Path.GetFileName(outside) + "/evil")).Kind);
            Assert.Equal(0, reg.Count);
            Assert.Equal(1, reg.Load("x", "sd3", "link-in").Version);
        }
        finally { Directory.Delete(outside, true); }
    }
}

/// <summary>Runs alone (no parallel test class allocates meanwhile) so RSS reflects this test only.</summary>
[Collection(Infrastructure.MemoryMeasurementCollection.Name)]
public partial class AdapterMemoryTests(Xunit.Abstractions.ITestOutputHelper output)
{
    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "malloc_trim")]
    private static partial int malloc_trim(nuint pad);

    [Fact]
    public void LoadUnload200TimesReturnsToBaselineRss()
    {
        var dir = TempDir();
        try
        {
            // A ~6 MB adapter so that a leak of one copy per cycle would be >1 GB after 200 cycles.
            var linears = new Dictionary<string, (long, long)>();
            for (int i = 0; i < 12; i++)
                foreach (var p in new[] { "to_q", "to_k", "to_v", "to_out.0" })
                    linears[$"transformer_blocks.{i}.attn.{p}"] = (512, 512);
            var targets = new LoraTargetSet("sd3", linears);
            using (var w = LoraWeights.CreateRandom(targets, linears.Keys, rank: 32, alpha: 64, seed: 1))
                LoraFormats.SaveDiffusers(w, dir);

            using var reg = new AdapterRegistry(new AdapterRegistryOptions { AdaptersRoot = dir });
            // float64 "device" copies, so every load also materialises and frees a converted copy.
            reg.RegisterBackbone(new AdapterBackbone("sd3", targets, CPU, ScalarType.Float64));
            var lin = new LoRACompatibleLinear(512, 512) { Path = "transformer_blocks.3.attn.to_q" };
            lin.to(ScalarType.Float64);
            using var x = randn(2, 512, dtype: ScalarType.Float64);

            void Cycle()
            {
                reg.Load("a", "sd3", ".");
                using (var lease = reg.Acquire(["a"]))
                using (var hook = lease.CreateHook([("a", 1.0)]))
                using (LinearHooks.Use(hook))
                using (no_grad())
                using (var s = NewDisposeScope())
                    Assert.True(double.IsFinite(lin.forward(x).sum().item<double>()));
                reg.Unload("a");
            }

            static long Rss()
            {
                for (int i = 0; i < 3; i++) { GC.Collect(); GC.WaitForPendingFinalizers(); }
                // Hand free heap pages back to the OS so RSS counts live memory, not glibc's free lists
                // (freed tensor buffers otherwise stay resident and RSS swings by ±10 MB between samples).
                if (OperatingSystem.IsLinux()) malloc_trim(0);
                using var p = Process.GetCurrentProcess();
                p.Refresh();
                return p.WorkingSet64;
            }

            // Median of three samples five cycles apart: other objects of this test process being
            // finalised meanwhile move a single sample by a few percent either way.
            long Sample() => new[] { Rss(), Run(5, Rss), Run(5, Rss) }.Order().ElementAt(1);
            long Run(int n, Func<long> then) { for (int i = 0; i < n; i++) Cycle(); return then(); }

            Run(50, () => 0); // warm-up: allocator pools, JIT, mmap paths
            long baseline = Sample();
            Run(200, () => 0);
            long after = Sample();
            double growth = (after - baseline) / (double)baseline;
            output.WriteLine($"RSS baseline {baseline / 1e6:F1} MB, after 200 cycles {after / 1e6:F1} MB ({growth:P2})");
            Assert.True(growth < 0.05, $"RSS grew {growth:P1} ({baseline / 1e6:F0} MB -> {after / 1e6:F0} MB) over 200 load/unload cycles");
            Assert.Equal(0, reg.Count);
        }
        finally { Directory.Delete(dir, true); }
    }
}
