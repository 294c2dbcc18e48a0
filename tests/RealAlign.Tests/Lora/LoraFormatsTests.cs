using System.Text.Json.Nodes;
using RealAlign.Core.IO;
using RealAlign.Core.Lora;
using TorchSharp;
using static TorchSharp.torch;
using static RealAlign.Tests.Lora.LoraTestUtil;

namespace RealAlign.Tests.Lora;

public class LoraFormatsTests
{
    private static (int Rank, double Alpha, List<string> Adapted, List<string> TargetModules) CaseLora(Infrastructure.GoldenCase c)
    {
        var l = c.Json["lora"]!.AsObject();
        return (l["rank"]!.GetValue<int>(), l["lora_alpha"]!.GetValue<double>(),
            l["adapted_modules"]!.AsArray().Select(x => x!.ToString()).ToList(),
            l["target_modules"]!.AsArray().Select(x => x!.ToString()).ToList());
    }

    [Fact]
    public void DetectsBothFixtureFormats()
    {
        using var c = LoraCase();
        Assert.Equal("diffusers", LoraFormats.Locate(c.PathOf("lora_diffusers")).Format);
        Assert.Equal("diffusers", LoraFormats.Locate(c.PathOf("lora_diffusers", LoraFormats.DiffusersWeightName)).Format);
        var peft = LoraFormats.Locate(c.PathOf("lora_peft"));
        Assert.Equal("peft", peft.Format);
        Assert.NotNull(peft.ConfigFile);
        Assert.Equal("peft", LoraFormats.Locate(c.PathOf("lora_peft", LoraFormats.PeftWeightName)).Format);
    }

    [Fact]
    public void LoadsDiffusersAndPeftWithTheirAlphaConventions()
    {
        using var c = LoraCase();
        var (rank, alpha, adapted, _) = CaseLora(c);
        var loadedAlpha = c.Json["loaded_lora_alpha"]!.AsObject();
        var targets = Sd3Targets(c);
        using var diff = LoraFormats.Load(c.PathOf("lora_diffusers"), targets);
        using var peft = LoraFormats.Load(c.PathOf("lora_peft"), targets);

        Assert.Equal(adapted.OrderBy(x => x, StringComparer.Ordinal), diff.Targets);
        Assert.Equal(adapted.OrderBy(x => x, StringComparer.Ordinal), peft.Targets);
        Assert.Equal("diffusers", diff.Format);
        Assert.Equal("peft", peft.Format);
        foreach (var m in diff.Modules.Values)
        {
            Assert.Equal(rank, m.Rank);
            Assert.Equal(loadedAlpha["diffusers_path"]!.GetValue<double>(), m.Alpha);
            Assert.Equal(1.0, diff.Scaling(m.Path));
            var p = peft.Modules[m.Path];
            Assert.Equal(loadedAlpha["peft_path"]!.GetValue<double>(), p.Alpha);
            Assert.Equal(alpha / rank, peft.Scaling(m.Path));
            // Both files hold the same A and B (the case's cross_check: diffusers at 1.0 == peft at 0.5).
            Assert.True(BitEqual(m.A, p.A), m.Path);
            Assert.True(BitEqual(m.B, p.B), m.Path);
        }
        Assert.Equal(64, diff.Sha256.Length);
        Assert.Equal(new FileInfo(c.PathOf("lora_diffusers", LoraFormats.DiffusersWeightName)).Length, diff.ByteSize);
        Assert.Equal(2, peft.Files.Count);
    }

    [Fact]
    public void PeftTargetModulesUseSuffixMatchingIncludingAttn2()
    {
        using var c = LoraCase();
        var (_, _, adapted, targetModules) = CaseLora(c);
        var cfg = new LoraConfig { TargetModules = targetModules };
        var targets = Sd3Targets(c);
        var selected = targets.Linears.Keys.Where(cfg.IsTarget).OrderBy(x => x, StringComparer.Ordinal).ToList();
        Assert.Equal(adapted.OrderBy(x => x, StringComparer.Ordinal), selected);
        Assert.Contains("transformer_blocks.0.attn2.to_q", selected);
        // RealAlign's 'attn.'-prefixed names leave attn2 alone.
        var prefixed = new LoraConfig { TargetModules = targetModules.Select(t => "attn." + t).ToList() };
        Assert.DoesNotContain(targets.Linears.Keys, p => p.Contains("attn2") && prefixed.IsTarget(p));
        Assert.True(prefixed.IsTarget("transformer_blocks.0.attn.to_q"));
        // String form: full regex match.
        var rx = new LoraConfig { TargetModulesRegex = @".*attn2\.to_[qk]" };
        Assert.Equal(2, targets.Linears.Keys.Count(rx.IsTarget));
    }

    [Fact]
    public void RankAndAlphaPatternsFollowPeft()
    {
        var cfg = new LoraConfig
        {
            R = 4, LoraAlpha = 8,
            RankPattern = new Dictionary<string, int> { ["^blocks.1.to_q"] = 2, ["to_k"] = 6 },
            AlphaPattern = new Dictionary<string, double> { ["to_k"] = 3 },
        };
        Assert.Equal((2, 8.0), cfg.RankAndAlpha("blocks.1.to_q"));
        Assert.Equal((4, 8.0), cfg.RankAndAlpha("blocks.11.to_q"));
        Assert.Equal((6, 3.0), cfg.RankAndAlpha("blocks.3.to_k"));
        Assert.Equal((4, 8.0), cfg.RankAndAlpha("blocks.3.to_v"));
    }

    [Fact]
    public void ExportRoundTripsLosslesslyWithDiffusersKeyNames()
    {
        using var c = LoraCase();
        var targets = Sd3Targets(c);
        using var peft = LoraFormats.Load(c.PathOf("lora_peft"), targets);
        var dir = TempDir();
        try
        {
            // diffusers format: same tensor keys as diffusers writes, alpha carried in lora_adapter_metadata.
            var file = LoraFormats.SaveDiffusers(peft, Path.Combine(dir, "d"));
            Assert.Equal(LoraFormats.DiffusersWeightName, Path.GetFileName(file));
            using (var st = SafeTensorsFile.Open(file))
            using (var fixture = SafeTensorsFile.Open(c.PathOf("lora_diffusers", LoraFormats.DiffusersWeightName)))
            {
                Assert.Equal(fixture.Tensors.Keys.OrderBy(k => k, StringComparer.Ordinal), st.Tensors.Keys.OrderBy(k => k, StringComparer.Ordinal));
                Assert.Equal("pt", st.Metadata["format"]);
                var meta = JsonNode.Parse(st.Metadata[LoraFormats.DiffusersMetadataKey])!.AsObject();
                Assert.Equal(4, meta["transformer.r"]!.GetValue<int>());
                Assert.Equal(8, meta["transformer.lora_alpha"]!.GetValue<double>());
                Assert.Equal("LORA", meta["transformer.peft_type"]!.ToString());
                Assert.Equal(peft.Modules.Count, meta["transformer.target_modules"]!.AsArray().Count);
                Assert.Equal(meta.Select(kv => kv.Key).OrderBy(k => k, StringComparer.Ordinal), meta.Select(kv => kv.Key));
            }
            using (var back = LoraFormats.Load(Path.Combine(dir, "d"), targets))
                AssertSame(peft, back);

            // peft format: same keys as peft writes; adapter_config.json with r / lora_alpha / targets.
            LoraFormats.SavePeft(peft, Path.Combine(dir, "p"), baseModelNameOrPath: "stabilityai/stable-diffusion-3.5-medium");
            using (var st = SafeTensorsFile.Open(Path.Combine(dir, "p", LoraFormats.PeftWeightName)))
            using (var fixture = SafeTensorsFile.Open(c.PathOf("lora_peft", LoraFormats.PeftWeightName)))
                Assert.Equal(fixture.Tensors.Keys.OrderBy(k => k, StringComparer.Ordinal), st.Tensors.Keys.OrderBy(k => k, StringComparer.Ordinal));
            var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "p", LoraFormats.PeftConfigName)))!.AsObject();
            Assert.Equal(4, cfg["r"]!.GetValue<int>());
            Assert.Equal(8, cfg["lora_alpha"]!.GetValue<double>());
            Assert.Equal("LORA", cfg["peft_type"]!.ToString());
            Assert.Equal("stabilityai/stable-diffusion-3.5-medium", cfg["base_model_name_or_path"]!.ToString());
            Assert.Equal(peft.Targets, cfg["target_modules"]!.AsArray().Select(x => x!.ToString()));
            Assert.Empty(Directory.GetFiles(Path.Combine(dir, "p"), "*.tmp", SearchOption.AllDirectories));
            using (var back = LoraFormats.Load(Path.Combine(dir, "p"), targets))
                AssertSame(peft, back);

            // A diffusers-origin adapter (alpha = r) round-trips through peft too.
            using var diff = LoraFormats.Load(c.PathOf("lora_diffusers"), targets);
            LoraFormats.SavePeft(diff, Path.Combine(dir, "p2"));
            using (var back = LoraFormats.Load(Path.Combine(dir, "p2"), targets))
                AssertSame(diff, back);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void MixedRanksAndAlphasRoundTripThroughPatterns()
    {
        using var c = LoraCase();
        var targets = Sd3Targets(c);
        var paths = targets.Linears.Keys.Where(p => p.Contains(".attn.")).OrderBy(p => p, StringComparer.Ordinal).ToList();
        using var r4 = LoraWeights.CreateRandom(targets, paths.Take(5), 4, 8, seed: 1);
        using var r2 = LoraWeights.CreateRandom(targets, paths.Skip(5).Take(2), 2, 3.5, seed: 2);
        var mixed = new LoraWeights(r4.Modules.Values.Concat(r2.Modules.Values).Select(m => new LoraModule(m.Path, m.A.clone(), m.B.clone(), m.Alpha)), useRsLora: true);
        using var _ = mixed;
        var dir = TempDir();
        try
        {
            LoraFormats.SaveDiffusers(mixed, Path.Combine(dir, "d"));
            LoraFormats.SavePeft(mixed, Path.Combine(dir, "p"));
            using var d = LoraFormats.Load(Path.Combine(dir, "d"), targets);
            using var p = LoraFormats.Load(Path.Combine(dir, "p"), targets);
            AssertSame(mixed, d);
            AssertSame(mixed, p);
            Assert.True(p.UseRsLora);
            Assert.Equal(3.5 / Math.Sqrt(2), p.Scaling(paths[5]));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void FoldedDiffusersExportScalesBLikeAlphaEqualsR()
    {
        using var c = LoraCase();
        var targets = Sd3Targets(c);
        using var peft = LoraFormats.Load(c.PathOf("lora_peft"), targets);
        var dir = TempDir();
        try
        {
            LoraFormats.SaveDiffusers(peft, dir, foldScalingIntoB: true);
            using var back = LoraFormats.Load(dir, targets);
            foreach (var m in peft.Modules.Values)
            {
                var b = back.Modules[m.Path];
                Assert.Equal(b.Rank, b.Alpha);
                Assert.True((b.B * back.Scaling(m.Path)).allclose(m.B * peft.Scaling(m.Path), 1e-6, 1e-7));
            }
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void KohyaKeysMapBackToModulePaths()
    {
        using var c = LoraCase();
        var targets = Sd3Targets(c);
        using var peft = LoraFormats.Load(c.PathOf("lora_peft"), targets);
        var dir = TempDir();
        try
        {
            var tensors = new Dictionary<string, Tensor>();
            foreach (var m in peft.Modules.Values)
            {
                var k = "lora_unet_" + m.Path.Replace('.', '_');
                tensors[k + ".lora_down.weight"] = m.A;
                tensors[k + ".lora_up.weight"] = m.B;
                tensors[k + ".alpha"] = tensor(8.0f);
            }
            var file = Path.Combine(dir, "kohya.safetensors");
            SafeTensorsFile.Save(file, tensors);
            Assert.Equal("kohya", LoraFormats.Locate(file).Format);
            using var k2 = LoraFormats.Load(file, targets);
            Assert.Equal("kohya", k2.Format);
            AssertSame(peft, k2);

            // Text-encoder and unknown kohya keys are reported by name.
            tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = zeros(4, 8);
            tensors["lora_unet_no_such_layer.lora_down.weight"] = zeros(4, 8);
            tensors["lora_unet_no_such_layer.lora_up.weight"] = zeros(8, 4);
            SafeTensorsFile.Save(file, tensors);
            var ex = Assert.Throws<LoraFormatException>(() => LoraFormats.Load(file, targets).Dispose());
            Assert.Contains(ex.Problems, p => p.Contains("lora_te1_text_model") && p.Contains("text-encoder"));
            Assert.Contains(ex.Problems, p => p.Contains("lora_unet_no_such_layer"));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void InitialisedAdapterStartsAsIdentity()
    {
        using var c = LoraCase();
        var (_, _, adapted, targetModules) = CaseLora(c);
        var targets = Sd3Targets(c);
        using var w = LoraWeights.CreateInitialized(targets, new LoraConfig { R = 32, LoraAlpha = 64, TargetModules = targetModules, InitLoraWeights = LoraInit.Gaussian }, seed: 3);
        Assert.Equal(adapted.Count, w.Modules.Count);
        Assert.All(w.Modules.Values, m => Assert.Equal(0, m.B.abs().sum().item<float>()));
        Assert.All(w.Modules.Values, m => Assert.True(m.A.abs().sum().item<float>() > 0));
        Assert.Equal(2.0, w.Scaling(adapted[0]));
    }

    internal static void AssertSame(LoraWeights expected, LoraWeights got)
    {
        Assert.Equal(expected.Targets, got.Targets);
        Assert.Equal(expected.UseRsLora, got.UseRsLora);
        foreach (var m in expected.Modules.Values)
        {
            var g = got.Modules[m.Path];
            Assert.True(BitEqual(m.A, g.A), m.Path + " A");
            Assert.True(BitEqual(m.B, g.B), m.Path + " B");
            Assert.Equal(m.Alpha, g.Alpha);
            Assert.Equal(expected.Scaling(m.Path), got.Scaling(m.Path));
        }
    }
}
