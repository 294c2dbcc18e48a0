using System.Text.Json.Serialization;
using RealAlign.Core.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Schedulers;

/// <summary>scheduler_config.json of diffusers' FlowMatchEulerDiscreteScheduler (defaults as upstream).</summary>
public sealed record FlowMatchEulerDiscreteSchedulerConfig
{
    [JsonPropertyName("num_train_timesteps")] public int NumTrainTimesteps { get; init; } = 1000;
    [JsonPropertyName("shift")] public double Shift { get; init; } = 1.0;
    [JsonPropertyName("use_dynamic_shifting")] public bool UseDynamicShifting { get; init; }
    [JsonPropertyName("base_shift")] public double? BaseShift { get; init; } = 0.5;
    [JsonPropertyName("max_shift")] public double? MaxShift { get; init; } = 1.15;
    [JsonPropertyName("base_image_seq_len")] public int? BaseImageSeqLen { get; init; } = 256;
    [JsonPropertyName("max_image_seq_len")] public int? MaxImageSeqLen { get; init; } = 4096;
    [JsonPropertyName("invert_sigmas")] public bool InvertSigmas { get; init; }
    [JsonPropertyName("shift_terminal")] public double? ShiftTerminal { get; init; }
    [JsonPropertyName("use_karras_sigmas")] public bool? UseKarrasSigmas { get; init; }
    [JsonPropertyName("use_exponential_sigmas")] public bool? UseExponentialSigmas { get; init; }
    [JsonPropertyName("use_beta_sigmas")] public bool? UseBetaSigmas { get; init; }
}

/// <summary>
/// Euler sampler for rectified-flow models (diffusers 0.32.2
/// schedulers/scheduling_flow_match_euler_discrete.py). Pure math: the schedule is kept as float32
/// arrays exactly as upstream stores its float32 tensors, and tensors are only touched by
/// <see cref="Step"/> and <see cref="ScaleNoise(Tensor, Tensor, Tensor)"/>.
/// </summary>
/// <remarks>
/// Upstream precision is reproduced stage by stage: the init schedule is float32 (torch), the
/// <c>set_timesteps</c> linspace and shift run in float64 (numpy) unless explicit sigmas are given
/// (then float32, <c>np.array(sigmas).astype(np.float32)</c>), and the result is cast to float32
/// before <c>timesteps = sigmas * num_train_timesteps</c> in float32.
/// </remarks>
public sealed class FlowMatchEulerDiscreteScheduler
{
    public FlowMatchEulerDiscreteSchedulerConfig Config { get; }

    /// <summary>The static shift (upstream <c>scheduler.shift</c>; <see cref="SetShift"/> changes it).</summary>
    public double Shift { get; private set; }

    /// <summary>float32 timesteps, <c>sigma * num_train_timesteps</c> (length = number of steps).</summary>
    public IReadOnlyList<float> Timesteps => _timesteps;

    /// <summary>float32 sigmas with the terminal value appended (0, or 1 with invert_sigmas): length steps + 1.</summary>
    public IReadOnlyList<float> Sigmas => _sigmas;

    public int NumInferenceSteps { get; private set; }

    /// <summary>Index into <see cref="Sigmas"/> of the next <see cref="Step"/> (null until the first step).</summary>
    public int? StepIndex { get; private set; }

    /// <summary>First step index, set by img2img-style pipelines (<see cref="SetBeginIndex"/>).</summary>
    public int? BeginIndex { get; private set; }

    /// <summary>Largest and smallest sigma of the training schedule built at construction.</summary>
    public double SigmaMax { get; }
    public double SigmaMin { get; }

    private float[] _timesteps;
    private float[] _sigmas;

    public FlowMatchEulerDiscreteScheduler(FlowMatchEulerDiscreteSchedulerConfig config)
    {
        Config = config;
        int extra = (config.UseKarrasSigmas == true ? 1 : 0) + (config.UseExponentialSigmas == true ? 1 : 0) + (config.UseBetaSigmas == true ? 1 : 0);
        if (extra > 1)
            throw new ArgumentException("Only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be set.");
        if (extra > 0)
            throw new NotSupportedException(
                "FlowMatchEulerDiscreteScheduler: use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas are not implemented " +
                $"(config has karras={config.UseKarrasSigmas}, exponential={config.UseExponentialSigmas}, beta={config.UseBetaSigmas}).");
        if (config.NumTrainTimesteps < 1)
            throw new ArgumentOutOfRangeException(nameof(config), $"num_train_timesteps must be >= 1, got {config.NumTrainTimesteps}");

        Shift = config.Shift;
        int n = config.NumTrainTimesteps;
        // Upstream __init__: float32 linspace(1, N, N) reversed, sigma = t / N, static shift in float32.
        var sigmas = new float[n];
        float shift = (float)config.Shift;
        var trainTimesteps = NumpyLinspace(1, n, n);
        for (int i = 0; i < n; i++)
        {
            float t = (float)trainTimesteps[n - 1 - i];
            float s = t / n;
            if (!config.UseDynamicShifting) s = shift * s / (1f + (shift - 1f) * s);
            sigmas[i] = s;
        }
        _sigmas = sigmas;
        _timesteps = sigmas.Select(s => s * n).ToArray();
        SigmaMax = sigmas[0];
        SigmaMin = sigmas[^1];
    }

    /// <summary>Reads <c>scheduler_config.json</c> from a scheduler folder (or takes the file path itself).</summary>
    public static FlowMatchEulerDiscreteScheduler FromPretrained(string folderOrConfigPath)
    {
        var path = Directory.Exists(folderOrConfigPath) ? Path.Combine(folderOrConfigPath, "scheduler_config.json") : folderOrConfigPath;
        return new FlowMatchEulerDiscreteScheduler(ModelLoading.ReadConfig<FlowMatchEulerDiscreteSchedulerConfig>(path));
    }

    public void SetShift(double shift) => Shift = shift;

    public void SetBeginIndex(int beginIndex = 0) => BeginIndex = beginIndex;

    /// <summary>
    /// Builds the sampling schedule (upstream <c>set_timesteps</c>). Either a step count (sigmas spaced
    /// linearly between the training schedule's sigma_max and sigma_min) or explicit
    /// <paramref name="sigmas"/> (their count is the step count). <paramref name="mu"/> is required
    /// with use_dynamic_shifting (see <see cref="CalculateShift"/>).
    /// </summary>
    public void SetTimesteps(int? numInferenceSteps = null, double? mu = null, double[]? sigmas = null)
    {
        if (Config.UseDynamicShifting && mu is null)
            throw new ArgumentException("mu must be given when use_dynamic_shifting is true (see CalculateShift).", nameof(mu));

        double[] work;
        bool float32Path; // numpy arrays are float32 when explicit sigmas are given, float64 otherwise
        if (sigmas is null)
        {
            if (numInferenceSteps is not int steps || steps < 1)
                throw new ArgumentException($"numInferenceSteps must be >= 1 when no sigmas are given (got {numInferenceSteps}).", nameof(numInferenceSteps));
            int nt = Config.NumTrainTimesteps;
            work = NumpyLinspace(SigmaMax * nt, SigmaMin * nt, steps).Select(t => t / nt).ToArray();
            float32Path = false;
        }
        else
        {
            if (sigmas.Length == 0) throw new ArgumentException("sigmas is empty.", nameof(sigmas));
            work = sigmas.Select(s => (double)(float)s).ToArray();
            float32Path = true;
        }
        NumInferenceSteps = work.Length;

        if (Config.UseDynamicShifting)
            work = work.Select(t => float32Path ? TimeShiftF32(mu!.Value, (float)t) : TimeShiftF64(mu!.Value, t)).ToArray();
        else
            work = work.Select(t => float32Path ? StaticShiftF32(Shift, (float)t) : StaticShiftF64(Shift, t)).ToArray();

        if (Config.ShiftTerminal is double terminal && terminal != 0)
            work = StretchShiftToTerminal(work, terminal, float32Path);

        var s32 = work.Select(v => (float)v).ToArray();
        int n = Config.NumTrainTimesteps;
        float[] timesteps;
        float terminalSigma;
        if (Config.InvertSigmas)
        {
            for (int i = 0; i < s32.Length; i++) s32[i] = 1f - s32[i];
            terminalSigma = 1f;
        }
        else terminalSigma = 0f;
        timesteps = s32.Select(v => v * n).ToArray();

        _sigmas = [.. s32, terminalSigma];
        _timesteps = timesteps;
        StepIndex = null;
        BeginIndex = null;
    }

    /// <summary>
    /// Schedule shift μ as a linear function of the image token count (diffusers
    /// pipeline_stable_diffusion_3.calculate_shift, defaults included; pipelines pass the
    /// scheduler config's base/max values, see <see cref="CalculateShiftFromConfig"/>).
    /// </summary>
    public static double CalculateShift(int imageSeqLen, int baseSeqLen = 256, int maxSeqLen = 4096,
        double baseShift = 0.5, double maxShift = 1.16)
    {
        double m = (maxShift - baseShift) / (maxSeqLen - baseSeqLen);
        double b = baseShift - m * baseSeqLen;
        return imageSeqLen * m + b;
    }

    /// <summary><see cref="CalculateShift"/> with this scheduler's config values, as the SD3 pipeline calls it.</summary>
    public double CalculateShiftFromConfig(int imageSeqLen) =>
        CalculateShift(imageSeqLen, Config.BaseImageSeqLen ?? 256, Config.MaxImageSeqLen ?? 4096,
            Config.BaseShift ?? 0.5, Config.MaxShift ?? 1.15);

    /// <summary>
    /// Position of <paramref name="timestep"/> in <see cref="Timesteps"/> (exact float32 match). With
    /// duplicates the second match is taken, as upstream does so img2img never skips a sigma.
    /// </summary>
    public int IndexForTimestep(float timestep)
    {
        int first = -1;
        for (int i = 0; i < _timesteps.Length; i++)
        {
            if (_timesteps[i] != timestep) continue;
            if (first >= 0) return i;
            first = i;
        }
        if (first < 0)
            throw new ArgumentException($"timestep {timestep:R} is not in the schedule ({_timesteps.Length} timesteps, " +
                                        $"first {(_timesteps.Length > 0 ? _timesteps[0] : float.NaN):R}); pass one of scheduler.Timesteps.");
        return first;
    }

    /// <summary>
    /// One Euler step <c>x + (σ_next − σ)·v</c> at the scheduler's current step index (initialised from
    /// <paramref name="timestep"/> on the first call, as upstream), then advances the index. The sample
    /// is upcast to float32 for the update and the result cast to the model output's dtype.
    /// </summary>
    public Tensor Step(Tensor modelOutput, float timestep, Tensor sample)
    {
        StepIndex ??= BeginIndex ?? IndexForTimestep(timestep);
        var result = StepAt(StepIndex.Value, modelOutput, sample);
        StepIndex++;
        return result;
    }

    /// <inheritdoc cref="Step(Tensor, float, Tensor)"/>
    public Tensor Step(Tensor modelOutput, Tensor timestep, Tensor sample)
    {
        if (!timestep.is_floating_point())
            throw new ArgumentException("Integer timesteps (e.g. step indices) are not accepted; pass one of scheduler.Timesteps or use StepAt.", nameof(timestep));
        return Step(modelOutput, timestep.flatten()[0].to(ScalarType.Float32).item<float>(), sample);
    }

    /// <summary>
    /// Stateless Euler step from sigma index <paramref name="stepIndex"/> to <paramref name="stepIndex"/>+1
    /// (does not touch <see cref="StepIndex"/>): for trainers and callers that track the index themselves.
    /// </summary>
    public Tensor StepAt(int stepIndex, Tensor modelOutput, Tensor sample)
    {
        if (stepIndex < 0 || stepIndex + 1 >= _sigmas.Length)
            throw new ArgumentOutOfRangeException(nameof(stepIndex), $"step index {stepIndex} outside [0, {_sigmas.Length - 2}] (call SetTimesteps first?)");
        using var scope = NewDisposeScope();
        // Same dtype semantics as upstream: float32 0-dim (σ_next − σ) times the model output, added to
        // the float32 sample, cast back to the model output's dtype.
        var dSigma = torch.tensor(_sigmas[stepIndex + 1] - _sigmas[stepIndex], ScalarType.Float32);
        var prev = sample.to(ScalarType.Float32) + dSigma * modelOutput;
        return prev.to(modelOutput.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Flow-matching forward process <c>σ·noise + (1 − σ)·sample</c> (upstream <c>scale_noise</c>), with
    /// one timestep per batch row (or one for all); sigma is looked up the way upstream does it
    /// (by timestep, or from the begin/step index when a pipeline has set one).
    /// </summary>
    public Tensor ScaleNoise(Tensor sample, Tensor timestep, Tensor noise)
    {
        float[] ts;
        using (var t = timestep.detach().flatten().to(ScalarType.Float32).cpu()) ts = t.data<float>().ToArray();
        return ScaleNoiseByTimesteps(sample, ts, noise);
    }

    /// <inheritdoc cref="ScaleNoise(Tensor, Tensor, Tensor)"/>
    public Tensor ScaleNoise(Tensor sample, float timestep, Tensor noise) => ScaleNoiseByTimesteps(sample, [timestep], noise);

    private Tensor ScaleNoiseByTimesteps(Tensor sample, IReadOnlyList<float> timesteps, Tensor noise)
    {
        int[] indices;
        if (BeginIndex is null) indices = timesteps.Select(IndexForTimestep).ToArray();
        else indices = Enumerable.Repeat(StepIndex ?? BeginIndex.Value, timesteps.Count).ToArray();
        return ScaleNoiseAt(sample, indices, noise);
    }

    /// <summary><c>σ·noise + (1 − σ)·sample</c> with σ = <see cref="Sigmas"/>[index] per batch row (one index broadcasts).</summary>
    public Tensor ScaleNoiseAt(Tensor sample, IReadOnlyList<int> sigmaIndices, Tensor noise)
    {
        using var scope = NewDisposeScope();
        var picked = sigmaIndices.Select(i => i >= 0 && i < _sigmas.Length ? _sigmas[i]
            : throw new ArgumentOutOfRangeException(nameof(sigmaIndices), $"sigma index {i} outside [0, {_sigmas.Length - 1}]")).ToArray();
        // Upstream casts the float32 sigmas to the sample's dtype before the blend.
        var sigma = torch.tensor(picked, ScalarType.Float32).to(sample.dtype, sample.device);
        while (sigma.dim() < sample.dim()) sigma = sigma.unsqueeze(-1);
        var result = sigma * noise + (1.0 - sigma) * sample;
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>float32 tensor of <see cref="Timesteps"/>.</summary>
    public Tensor TimestepsTensor(Device? device = null) => torch.tensor(_timesteps, ScalarType.Float32, device);

    /// <summary>float32 tensor of <see cref="Sigmas"/> (terminal value included).</summary>
    public Tensor SigmasTensor(Device? device = null) => torch.tensor(_sigmas, ScalarType.Float32, device);

    // --- upstream arithmetic, precision-faithful ---

    /// <summary>numpy.linspace(start, stop, num) in float64 (endpoint=True): start + i·step, last = stop.</summary>
    internal static double[] NumpyLinspace(double start, double stop, int num)
    {
        var y = new double[num];
        if (num == 0) return y;
        if (num == 1) { y[0] = start; return y; }
        int div = num - 1;
        double delta = stop - start;
        double step = delta / div;
        for (int i = 0; i < num; i++)
            y[i] = step == 0 ? (double)i / div * delta + start : i * step + start;
        y[^1] = stop;
        return y;
    }

    private static double StaticShiftF64(double shift, double s) => shift * s / (1 + (shift - 1) * s);

    private static double StaticShiftF32(double shift, float s)
    {
        float f = (float)shift;
        return f * s / (1f + (f - 1f) * s);
    }

    // time_shift(mu, 1.0, t) = e^mu / (e^mu + (1/t − 1)^1); numpy keeps float32 arrays float32
    // (python scalars are cast to the array dtype).
    private static double TimeShiftF64(double mu, double t) => Math.Exp(mu) / (Math.Exp(mu) + (1 / t - 1));

    private static double TimeShiftF32(double mu, float t)
    {
        float e = (float)Math.Exp(mu);
        return e / (e + (1f / t - 1f));
    }

    // Lightricks LTX-Video rf.py, as upstream stretch_shift_to_terminal: rescale 1−σ so the last
    // sigma lands on shift_terminal.
    private static double[] StretchShiftToTerminal(double[] t, double terminal, bool float32Path)
    {
        var result = new double[t.Length];
        if (float32Path)
        {
            float scale = (float)((1f - (float)t[^1]) / (1 - terminal));
            for (int i = 0; i < t.Length; i++) result[i] = 1f - (1f - (float)t[i]) / scale;
        }
        else
        {
            double scale = (1 - t[^1]) / (1 - terminal);
            for (int i = 0; i < t.Length; i++) result[i] = 1 - (1 - t[i]) / scale;
        }
        return result;
    }
}
