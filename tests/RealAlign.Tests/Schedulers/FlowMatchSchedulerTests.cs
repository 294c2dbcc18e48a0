using System.Text.Json.Nodes;
using RealAlign.Core.Schedulers;
using RealAlign.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Tests.Schedulers;

/// <summary>Golden case flow_match_scheduler (diffusers 0.32.2); every part is driven by its case.json.</summary>
public class FlowMatchSchedulerTests
{
    private const string CaseName = "flow_match_scheduler";

    private static FlowMatchEulerDiscreteScheduler Load(GoldenCase c, string dirKey)
    {
        Assert.True(c.Json["scheduler_dirs"]!.AsObject().ContainsKey(dirKey), $"case.json scheduler_dirs lacks '{dirKey}'");
        return FlowMatchEulerDiscreteScheduler.FromPretrained(c.PathOf(dirKey));
    }

    [Fact]
    public void ConfigFilesMatchCaseJson()
    {
        using var c = Fixtures.Case(CaseName);
        foreach (var (dirKey, jsonKey) in new[] { ("scheduler", "config"), ("scheduler_dynamic", "dynamic_config") })
        {
            var cfg = Load(c, dirKey).Config;
            var expected = c.Json[jsonKey]!.AsObject();
            Assert.Equal(expected["num_train_timesteps"]!.GetValue<int>(), cfg.NumTrainTimesteps);
            Assert.Equal(expected["shift"]!.GetValue<double>(), cfg.Shift);
            Assert.Equal(expected["use_dynamic_shifting"]!.GetValue<bool>(), cfg.UseDynamicShifting);
            Assert.Equal(expected["base_shift"]!.GetValue<double>(), cfg.BaseShift);
            Assert.Equal(expected["max_shift"]!.GetValue<double>(), cfg.MaxShift);
            Assert.Equal(expected["base_image_seq_len"]!.GetValue<int>(), cfg.BaseImageSeqLen);
            Assert.Equal(expected["max_image_seq_len"]!.GetValue<int>(), cfg.MaxImageSeqLen);
            Assert.Equal(expected["invert_sigmas"]!.GetValue<bool>(), cfg.InvertSigmas);
            Assert.Equal(expected["shift_terminal"]?.GetValue<double>(), cfg.ShiftTerminal);
        }
    }

    [Fact]
    public void SetTimestepsMatchesForEveryStepCount()
    {
        using var c = Fixtures.Case(CaseName);
        var scheduler = Load(c, "scheduler");
        foreach (var node in c.Json["steps_list"]!.AsArray())
        {
            int n = node!.GetValue<int>();
            scheduler.SetTimesteps(n);
            Assert.Equal(n + 1, scheduler.Sigmas.Count);
            Assert.Equal(0f, scheduler.Sigmas[^1]);
            using var ts = scheduler.TimestepsTensor();
            using var sg = scheduler.SigmasTensor();
            c.AssertClose($"timesteps_n{n}", ts);
            c.AssertClose($"sigmas_n{n}", sg);
        }
    }

    [Fact]
    public void EulerLoopWithAffineFakeModelMatches()
    {
        using var c = Fixtures.Case(CaseName);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var scheduler = Load(c, "scheduler");
        double a = c.Json["fake_model"]!["a"]!.GetValue<double>();
        double b = c.Json["fake_model"]!["b"]!.GetValue<double>();
        int steps = c.Json["loop_steps"]!.GetValue<int>();

        scheduler.SetTimesteps(steps);
        c.AssertClose("loop_timesteps", scheduler.TimestepsTensor());
        c.AssertClose("loop_sigmas", scheduler.SigmasTensor());

        var x = c.In("x_T");
        var latents = new List<Tensor>();
        foreach (float t in scheduler.Timesteps)
        {
            var modelOutput = a * x + b;
            x = scheduler.Step(modelOutput, t, x);
            latents.Add(x);
        }
        Assert.Equal(steps, scheduler.StepIndex);
        c.AssertClose("loop_latents", stack(latents));
        c.AssertClose("loop_final", x);
    }

    [Fact]
    public void StatelessStepAtEqualsStatefulStep()
    {
        using var c = Fixtures.Case(CaseName);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var scheduler = Load(c, "scheduler");
        scheduler.SetTimesteps(c.Json["loop_steps"]!.GetValue<int>());
        var x = c.In("x_T");
        var v = c.In("scale_noise_noise");
        var viaIndex = scheduler.StepAt(3, v, x);
        scheduler.SetBeginIndex(3);
        var viaState = scheduler.Step(v, scheduler.Timesteps[3], x);
        Assert.True(viaIndex.allclose(viaState, 0, 0));
        Assert.Equal(4, scheduler.StepIndex);
    }

    [Fact]
    public void ScaleNoiseMatches()
    {
        using var c = Fixtures.Case(CaseName);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var scheduler = Load(c, "scheduler");
        // The procedure sets the same schedule as the loop before calling scale_noise.
        scheduler.SetTimesteps(c.Json["loop_steps"]!.GetValue<int>());
        var got = scheduler.ScaleNoise(c.In("scale_noise_sample"), c.In("scale_noise_timestep"), c.In("scale_noise_noise"));
        c.AssertClose("scale_noise_out", got);
    }

    [Fact]
    public void DynamicShiftingWithExplicitSigmasAndMuMatches()
    {
        using var c = Fixtures.Case(CaseName);
        using var scope = NewDisposeScope();
        var scheduler = Load(c, "scheduler_dynamic");
        Assert.True(scheduler.Config.UseDynamicShifting);
        Assert.Throws<ArgumentException>(() => scheduler.SetTimesteps(8));

        var sigmasIn = c.In("dynamic_sigmas_in").to(ScalarType.Float64).data<double>().ToArray();
        scheduler.SetTimesteps(sigmas: sigmasIn, mu: c.Json["dynamic_mu"]!.GetValue<double>());
        Assert.Equal(sigmasIn.Length, scheduler.NumInferenceSteps);
        c.AssertClose("dynamic_timesteps", scheduler.TimestepsTensor());
        c.AssertClose("dynamic_sigmas", scheduler.SigmasTensor());
    }

    [Fact]
    public void CalculateShiftIsLinearBetweenTheConfiguredEnds()
    {
        using var c = Fixtures.Case(CaseName);
        var cfg = Load(c, "scheduler_dynamic");
        var dyn = c.Json["dynamic_config"]!.AsObject();
        int baseLen = dyn["base_image_seq_len"]!.GetValue<int>(), maxLen = dyn["max_image_seq_len"]!.GetValue<int>();
        double baseShift = dyn["base_shift"]!.GetValue<double>(), maxShift = dyn["max_shift"]!.GetValue<double>();
        Assert.Equal(baseShift, cfg.CalculateShiftFromConfig(baseLen), 12);
        Assert.Equal(maxShift, cfg.CalculateShiftFromConfig(maxLen), 12);
        Assert.Equal((baseShift + maxShift) / 2,
            FlowMatchEulerDiscreteScheduler.CalculateShift((baseLen + maxLen) / 2, baseLen, maxLen, baseShift, maxShift), 12);
    }

    [Fact]
    public void UnsupportedSigmaSchedulesAreRejected()
    {
        using var c = Fixtures.Case(CaseName);
        var cfg = FlowMatchEulerDiscreteScheduler.FromPretrained(c.PathOf("scheduler")).Config;
        Assert.Throws<NotSupportedException>(() => new FlowMatchEulerDiscreteScheduler(cfg with { UseKarrasSigmas = true }));
        Assert.Throws<NotSupportedException>(() => new FlowMatchEulerDiscreteScheduler(cfg with { UseBetaSigmas = true }));
    }
}
