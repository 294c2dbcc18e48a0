using System.Globalization;
using System.Text.RegularExpressions;
using RealAlign.Core.Lora;
using RealAlign.Core.Models;
using RealAlign.Core.Models.Transformers;
using RealAlign.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Tests.Lora;

/// <summary>
/// sd3_lora: SD3Transformer2DModel outputs with the case's adapter loaded the way diffusers
/// (load_lora_weights, alpha = r) and peft (PeftModel, alpha/r from adapter_config.json) load it, at
/// every stored lora scale and disabled. Format folders are <c>lora_&lt;format&gt;</c> (case.json adapter_dirs);
/// the outputs to reproduce are every <c>out.&lt;format&gt;.scale_&lt;s&gt;</c> and <c>out.&lt;format&gt;.disabled</c>.
/// </summary>
public class Sd3LoraParityTests
{
    private static readonly Regex ScaledOutput = new(@"^(?<fmt>\w+)\.scale_(?<s>[-0-9.eE+]+)$");

    public static TheoryData<string> Formats()
    {
        using var c = Fixtures.Case("sd3_lora");
        var data = new TheoryData<string>();
        foreach (var fmt in c.OutNames.Select(n => ScaledOutput.Match(n)).Where(m => m.Success).Select(m => m.Groups["fmt"].Value).Distinct())
            data.Add(fmt);
        return data;
    }

    private static Tensor[] Inputs(GoldenCase c) =>
        new[] { "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep" }.Select(c.In).ToArray();

    private static SD3Transformer2DModel BaseModel(GoldenCase c) =>
        SD3Transformer2DModel.FromPretrained(Path.GetFullPath(Path.Combine(c.Dir, c.Json["base_model_dir"]!.GetValue<string>())));

    [Fact]
    public void EveryStoredScaleAndFormatIsCovered()
    {
        using var c = Fixtures.Case("sd3_lora");
        var scales = c.Json["lora_scales"]!.AsArray().Select(x => x!.GetValue<double>()).ToHashSet();
        var formats = ((IEnumerable<object[]>)Formats()).Select(r => (string)r[0]).ToList();
        Assert.NotEmpty(formats);
        foreach (var fmt in formats)
        {
            Assert.True(Directory.Exists(c.PathOf("lora_" + fmt)), $"adapter folder lora_{fmt}");
            var stored = c.OutNames.Select(n => ScaledOutput.Match(n)).Where(m => m.Success && m.Groups["fmt"].Value == fmt)
                .Select(m => double.Parse(m.Groups["s"].Value, CultureInfo.InvariantCulture)).ToHashSet();
            Assert.Equal(scales.OrderBy(x => x), stored.OrderBy(x => x));
            Assert.True(c.HasOut(fmt + ".disabled"));
        }
    }

    [Theory]
    [MemberData(nameof(Formats))]
    public void TransformerWithAdapterMatchesUpstream(string format)
    {
        using var c = Fixtures.Case("sd3_lora");
        using var model = BaseModel(c);
        var targets = LoraTargetSet.FromModule(model, "sd3");
        using var weights = LoraFormats.Load(c.PathOf("lora_" + format), targets, new LoraLoadOptions { Format = format });
        Assert.Equal(format, weights.Format);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var x = Inputs(c);

        c.AssertClose("base", model.forward(x[0], x[1], x[2], x[3]));
        foreach (var name in c.OutNames)
        {
            var m = ScaledOutput.Match(name);
            if (!m.Success || m.Groups["fmt"].Value != format) continue;
            double s = double.Parse(m.Groups["s"].Value, CultureInfo.InvariantCulture);
            using var hook = new LoraHook(weights, s);
            using (LinearHooks.Use(hook)) c.AssertClose(name, model.forward(x[0], x[1], x[2], x[3]));
        }
        // Disabled = no hook (diffusers disable_lora / peft disable_adapter).
        c.AssertClose(format + ".disabled", model.forward(x[0], x[1], x[2], x[3]));
    }

    [Theory]
    [MemberData(nameof(Formats))]
    public void MergedAdapterMatchesUpstreamAndUnmergeRestoresBaseWeights(string format)
    {
        using var c = Fixtures.Case("sd3_lora");
        using var model = BaseModel(c);
        var targets = LoraTargetSet.FromModule(model, "sd3");
        using var weights = LoraFormats.Load(c.PathOf("lora_" + format), targets);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var before = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        var x = Inputs(c);
        foreach (var name in c.OutNames)
        {
            var m = ScaledOutput.Match(name);
            if (!m.Success || m.Groups["fmt"].Value != format) continue;
            double s = double.Parse(m.Groups["s"].Value, CultureInfo.InvariantCulture);
            using (LoraMerge.Merge(model, weights, s))
                c.AssertClose(name, model.forward(x[0], x[1], x[2], x[3]));
            foreach (var (k, v) in model.state_dict())
                Assert.True(LoraTestUtil.BitEqual(v, before[k]), $"{k} not restored after unmerging scale {s}");
        }
        c.AssertClose(format + ".disabled", model.forward(x[0], x[1], x[2], x[3]));
    }

    [Fact]
    public void ModelTargetSetAgreesWithTheCaseAdaptedModules()
    {
        using var c = Fixtures.Case("sd3_lora");
        using var model = BaseModel(c);
        var targets = LoraTargetSet.FromModule(model, "sd3");
        var lora = c.Json["lora"]!.AsObject();
        var cfg = new LoraConfig { TargetModules = lora["target_modules"]!.AsArray().Select(t => t!.GetValue<string>()).ToList() };
        var expected = lora["adapted_modules"]!.AsArray().Select(t => t!.GetValue<string>()).OrderBy(p => p, StringComparer.Ordinal);
        Assert.Equal(expected, targets.Linears.Keys.Where(cfg.IsTarget).OrderBy(p => p, StringComparer.Ordinal));
    }
}

/// <summary>
/// sd3_pipeline_lora through the core pipeline (the gRPC test covers the same through the server):
/// no adapter, then each <c>adapters/&lt;format&gt;</c> at every stored scale, installed as a
/// <see cref="LoraHook"/> around the pipeline call (the CFG-doubled batch uses the same scale).
/// </summary>
public class Sd3PipelineLoraTests
{
    private static readonly Regex Scaled = new(@"^(?<fmt>\w+)\.scale_(?<s>[-0-9.eE+]+)\.final_latents$");

    [Fact]
    public void PipelineWithAdaptersMatchesUpstream()
    {
        using var c = Fixtures.Case("sd3_pipeline_lora");
        using var pipe = RealAlign.Core.Pipelines.StableDiffusion3Pipeline.FromPretrained(c.PathOf(c.Json["pipeline_dir"]!.GetValue<string>()));
        var targets = LoraTargetSet.FromModule(pipe.Transformer, pipe.Family);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var latents = c.In("latents");
        var o = PipelineCases.OptionsFrom(c, latents);

        void Check(string prefix, LoraHook? hook)
        {
            IReadOnlyList<RealAlign.Core.Pipelines.GeneratedSample> samples;
            using (LinearHooks.Use(hook)) samples = pipe.Generate(o, null, CancellationToken.None);
            c.AssertClose(prefix + ".final_latents", stack(samples.Select(s => s.Latents).ToArray(), 0));
            c.AssertClose(prefix + ".image", stack(samples.Select(s => s.Image).ToArray(), 0));
            foreach (var s in samples) s.Dispose();
        }

        Check("base", null);
        int checkedCount = 0;
        foreach (var name in c.OutNames)
        {
            var m = Scaled.Match(name);
            if (!m.Success) continue;
            var fmt = m.Groups["fmt"].Value;
            double s = double.Parse(m.Groups["s"].Value, CultureInfo.InvariantCulture);
            using var w = LoraFormats.Load(c.PathOf("adapters", fmt), targets, new LoraLoadOptions { Format = fmt });
            using var hook = new LoraHook(w, s, scope: targets);
            Check(name[..^".final_latents".Length], hook);
            checkedCount++;
        }
        Assert.True(checkedCount >= 3, $"only {checkedCount} adapter outputs found");
    }
}
