using System.Diagnostics;
using RealAlign.Core.Lora;
using RealAlign.Core.Models;
using RealAlign.Core.Pipelines;
using static TorchSharp.torch;

namespace RealAlign.Bench;

/// <summary>
/// LoRA serving costs, measured side by side in one run:
/// (1) hot-swap latency for an SD3.5-Medium-shaped rank-32 adapter on every attention projection
///     (24 blocks × 1536 hidden, attn2 in blocks 0-12; random values, shapes only): Load call under
///     an existing name → new version installed and usable by the next request (parse, validate,
///     sha256, finite check, device copies);
/// (2) the same on the embedded tiny default, Load call → first image generated with the new version;
/// (3) per-step cost of the tiny default's transformer (CFG batch of 2) without LoRA, with the adapter
///     served unmerged (hook) and merged into the weights.
/// </summary>
public static class LoraBench
{
    private static readonly string[] AttnProjections = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"];
    private static readonly string[] Attn2Projections = ["to_q", "to_k", "to_v", "to_out.0"];

    /// <summary>SD3.5-Medium's adaptable attention projections (transformer config of the released checkpoint).</summary>
    public static LoraTargetSet Sd35MediumAttention(int layers = 24, long hidden = 1536, int dualLayers = 13)
    {
        var d = new Dictionary<string, (long, long)>();
        for (int i = 0; i < layers; i++)
        {
            foreach (var p in AttnProjections)
                if (!(i == layers - 1 && p == "to_add_out")) // the last block is context_pre_only
                    d[$"transformer_blocks.{i}.attn.{p}"] = (hidden, hidden);
            if (i < dualLayers)
                foreach (var p in Attn2Projections) d[$"transformer_blocks.{i}.attn2.{p}"] = (hidden, hidden);
        }
        return new LoraTargetSet("sd3", d);
    }

    private static double Median(List<double> xs) { xs.Sort(); return xs[xs.Count / 2]; }

    public static void Run()
    {
        Console.WriteLine("## lora");
        var dir = Directory.CreateTempSubdirectory("realalign-lora-bench-");
        try
        {
            // (1) SD3.5-M-shaped adapter.
            var targets = Sd35MediumAttention();
            long fileBytes;
            using (var w = LoraWeights.CreateRandom(targets, targets.Linears.Keys, rank: 32, alpha: 64, seed: 1))
                fileBytes = new FileInfo(LoraFormats.SaveDiffusers(w, Path.Combine(dir.FullName, "sd35m"))).Length;
            using (var reg = new AdapterRegistry(new AdapterRegistryOptions { AdaptersRoot = dir.FullName }))
            {
                reg.RegisterBackbone(new AdapterBackbone("sd35m", targets, CPU, ScalarType.Float32));
                reg.Load("style", "sd35m", "sd35m"); // warm-up (JIT, page cache)
                var swap = new List<double>();
                var hash = new List<double>();
                for (int i = 0; i < 7; i++)
                {
                    var sw = Stopwatch.StartNew();
                    reg.Load("style", "sd35m", "sd35m");
                    using (var lease = reg.Acquire(["style"])) using (lease.CreateHook([("style", 1.0)])) { }
                    swap.Add(sw.Elapsed.TotalMilliseconds);
                    sw.Restart();
                    LoraFormats.Describe(Path.Combine(dir.FullName, "sd35m", LoraFormats.DiffusersWeightName));
                    hash.Add(sw.Elapsed.TotalMilliseconds);
                }
                Console.WriteLine($"hot swap, SD3.5-M-shaped r=32 adapter ({targets.Linears.Count} projections, {fileBytes / 1e6:F0} MB, cpu float32): " +
                                  $"{Median(swap):F0} ms Load call → installed (median of 7; sha256 of the file alone {Median(hash):F0} ms); goal < 100 ms");
            }

            // (2) + (3) on the tiny default.
            using var pipe = TinySd3.Create();
            var tinyTargets = LoraTargetSet.FromModule(pipe.Transformer, pipe.Family);
            var attn = tinyTargets.Linears.Keys.Where(p => p.Contains(".attn.") || p.Contains(".attn2.")).ToList();
            foreach (var (name, seed) in new[] { ("v1", 2L), ("v2", 3L) })
                using (var w = LoraWeights.CreateRandom(tinyTargets, attn, rank: 32, alpha: 64, seed: seed, scaleB: 0.1))
                    LoraFormats.SavePeft(w, Path.Combine(dir.FullName, "tiny-" + name));
            var o = new GenerationOptions
            {
                Prompt = "a lighthouse at dusk", NegativePrompt = "blurry", Width = pipe.DefaultSize, Height = pipe.DefaultSize,
                NumInferenceSteps = 28, GuidanceScale = 5.0, Seeds = [1],
            };
            using (var reg = new AdapterRegistry(new AdapterRegistryOptions { AdaptersRoot = dir.FullName }))
            {
                reg.RegisterBackbone(new AdapterBackbone("tiny", tinyTargets, pipe.Device, pipe.DType));
                reg.Load("style", "tiny", "tiny-v1");
                double Image(bool withAdapter)
                {
                    var sw = Stopwatch.StartNew();
                    using var lease = withAdapter ? reg.Acquire(["style"]) : null;
                    using var hook = lease?.CreateHook([("style", 1.0)], tinyTargets);
                    using (LinearHooks.Use(hook)) using (no_grad()) using (NewDisposeScope())
                        foreach (var s in pipe.Generate(o, null, CancellationToken.None)) s.Dispose();
                    return sw.Elapsed.TotalMilliseconds;
                }
                Image(true); // warm-up
                var firstImage = new List<double>();
                var imageAlone = new List<double>();
                for (int i = 0; i < 5; i++)
                {
                    var sw = Stopwatch.StartNew();
                    reg.Load("style", "tiny", i % 2 == 0 ? "tiny-v2" : "tiny-v1");
                    double load = sw.Elapsed.TotalMilliseconds;
                    firstImage.Add(load + Image(true));
                    imageAlone.Add(Image(true));
                }
                Console.WriteLine($"hot swap, tiny-sd3 r=32 on {attn.Count} attention projections: {Median(firstImage):F0} ms Load call → first image with the new version " +
                                  $"(an image alone: {Median(imageAlone):F0} ms, 28 steps, {o.Width}x{o.Height}, CFG 5)");

                // (3) Per step = one transformer call on the CFG batch of 2.
                using var _ = no_grad();
                using var scope = NewDisposeScope();
                var cfg = pipe.Transformer.Config;
                long side = pipe.DefaultSize / pipe.VaeScaleFactor;
                var x = randn(2, cfg.InChannels, side, side);
                var ctx = randn(2, 154, cfg.JointAttentionDim);
                var pooled = randn(2, cfg.PooledProjectionDim);
                var t = full([2], 500f);
                double Step(LoraHook? hook, int reps = 40)
                {
                    using (LinearHooks.Use(hook)) using (NewDisposeScope()) pipe.Transformer.forward(x, ctx, pooled, t);
                    var times = new List<double>();
                    for (int i = 0; i < reps; i++)
                    {
                        var sw = Stopwatch.StartNew();
                        using (LinearHooks.Use(hook)) using (NewDisposeScope()) pipe.Transformer.forward(x, ctx, pooled, t);
                        times.Add(sw.Elapsed.TotalMilliseconds);
                    }
                    return Median(times);
                }
                using var lease = reg.Acquire(["style"]);
                double baseMs = Step(null);
                double unmerged;
                using (var hook = lease.CreateHook([("style", 1.0)], tinyTargets)) unmerged = Step(hook);
                double merged;
                using (LoraMerge.Merge(pipe.Transformer, lease["style"].Weights, 1.0)) merged = Step(null);
                Console.WriteLine($"per step, tiny-sd3 transformer (batch 2, {side}x{side} latents): base {baseMs:F2} ms, unmerged LoRA {unmerged:F2} ms (x{unmerged / baseMs:F2}), merged {merged:F2} ms (x{merged / baseMs:F2})");
            }
        }
        finally { dir.Delete(recursive: true); }
    }
}
