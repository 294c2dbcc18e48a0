using RealAlign.Core.IO;
using RealAlign.Core.Models;
using RealAlign.Core.Models.Autoencoders;
using RealAlign.Core.Models.Clip;
using RealAlign.Core.Models.Transformers;
using RealAlign.Core.Schedulers;
using RealAlign.Core.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Pipelines;

/// <summary>Prompt conditioning as SD3 builds it (diffusers StableDiffusion3Pipeline.encode_prompt).</summary>
public sealed record PromptEmbeddings(Tensor PromptEmbeds, Tensor PooledPromptEmbeds);

/// <summary>
/// StableDiffusion3Pipeline (diffusers 0.32.2, pipeline_stable_diffusion_3.py) without T5: the T5
/// part of the prompt embeddings is zeros, as diffusers does when text_encoder_3 is None.
/// Runs on the caller's thread; the executor owns no_grad and dispose scopes.
/// </summary>
public sealed class StableDiffusion3Pipeline : ITextToImagePipeline
{
    public SD3Transformer2DModel Transformer { get; }
    public AutoencoderKL Vae { get; }
    public CLIPTextModelWithProjection TextEncoder { get; }
    public CLIPTextModelWithProjection TextEncoder2 { get; }
    public ClipTokenizer Tokenizer { get; }
    public ClipTokenizer Tokenizer2 { get; }
    public FlowMatchEulerDiscreteSchedulerConfig SchedulerConfig { get; }
    public Device Device { get; }
    public ScalarType DType { get; }

    public string Family => "sd3";
    public int LatentChannels => (int)Transformer.Config.InChannels;
    public int VaeScaleFactor => Vae.ScaleFactor;
    public int SizeMultiple => VaeScaleFactor * (int)Transformer.Config.PatchSize;
    public int DefaultSize => (int)Transformer.Config.SampleSize * VaeScaleFactor;
    /// <summary>diffusers' tokenizer_max_length: CLIP's 77, also the length of the zero T5 block.</summary>
    public const int TokenizerMaxLength = 77;

    public StableDiffusion3Pipeline(SD3Transformer2DModel transformer, AutoencoderKL vae,
        CLIPTextModelWithProjection textEncoder, CLIPTextModelWithProjection textEncoder2,
        ClipTokenizer tokenizer, ClipTokenizer tokenizer2, FlowMatchEulerDiscreteSchedulerConfig schedulerConfig,
        Device device, ScalarType dtype)
    {
        Transformer = transformer; Vae = vae; TextEncoder = textEncoder; TextEncoder2 = textEncoder2;
        Tokenizer = tokenizer; Tokenizer2 = tokenizer2; SchedulerConfig = schedulerConfig; Device = device; DType = dtype;
        foreach (var m in new nn.Module[] { transformer, vae, textEncoder, textEncoder2 }) m.eval();
    }

    /// <summary>Loads a diffusers SD3/SD3.5 pipeline folder (model_index.json + component folders).</summary>
    public static StableDiffusion3Pipeline FromPretrained(string folder, Device? device = null, ScalarType dtype = ScalarType.Float32)
    {
        device ??= CPU;
        var f = DiffusersFolder.Open(folder);
        foreach (var c in new[] { "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler" })
            if (!f.Has(c)) throw new FileNotFoundException($"{folder}: SD3 pipeline component '{c}' is missing");
        if (f.Has("text_encoder_3"))
            Console.Error.WriteLine($"[realalign] {folder}: text_encoder_3 (T5) present but not used yet; its embedding block is zeros");
        return new StableDiffusion3Pipeline(
            SD3Transformer2DModel.FromPretrained(f.ComponentPath("transformer"), device, dtype),
            AutoencoderKL.FromPretrained(f.ComponentPath("vae"), device, dtype),
            CLIPTextModelWithProjection.FromPretrained(f.ComponentPath("text_encoder"), device, dtype),
            CLIPTextModelWithProjection.FromPretrained(f.ComponentPath("text_encoder_2"), device, dtype),
            ClipTokenizer.FromFolder(f.ComponentPath("tokenizer")),
            ClipTokenizer.FromFolder(f.ComponentPath("tokenizer_2")),
            ModelLoading.ReadConfig<FlowMatchEulerDiscreteSchedulerConfig>(Path.Combine(f.ComponentPath("scheduler"), "scheduler_config.json")),
            device, dtype);
    }

    // ---------------------------------------------------------------- prompt encoding

    private (Tensor Embeds, Tensor Pooled) ClipPromptEmbeds(IReadOnlyList<string> prompts, ClipTokenizer tok, CLIPTextModelWithProjection enc)
    {
        var (ids, _) = tok.EncodeBatch(prompts, TokenizerMaxLength);
        using var idsDev = ids.to(Device);
        var o = enc.forward(idsDev);
        // diffusers uses the penultimate hidden state (before final_layer_norm) per token, text_embeds pooled.
        return (o.HiddenStates[^2].to(DType), o.TextEmbeds.to(DType));
    }

    /// <summary>diffusers encode_prompt for one side (positive or negative), T5 absent.</summary>
    public PromptEmbeddings EncodePrompt(IReadOnlyList<string> prompts)
    {
        var (e1, p1) = ClipPromptEmbeds(prompts, Tokenizer, TextEncoder);
        var (e2, p2) = ClipPromptEmbeds(prompts, Tokenizer2, TextEncoder2);
        var clip = cat([e1, e2], -1);
        long joint = Transformer.Config.JointAttentionDim;
        var t5 = zeros(prompts.Count, TokenizerMaxLength, joint, dtype: DType, device: Device);
        clip = nn.functional.pad(clip, [0, joint - clip.shape[^1]]);
        return new PromptEmbeddings(cat([clip, t5], -2), cat([p1, p2], -1));
    }

    // ---------------------------------------------------------------- sampling

    public FlowMatchEulerDiscreteScheduler CreateScheduler(int numInferenceSteps, int latentHeight, int latentWidth)
    {
        var s = new FlowMatchEulerDiscreteScheduler(SchedulerConfig);
        double? mu = null;
        if (SchedulerConfig.UseDynamicShifting)
        {
            // pipeline_stable_diffusion_3: mu from the image token count when the scheduler shifts dynamically (SD3.5).
            int p = (int)Transformer.Config.PatchSize;
            mu = s.CalculateShiftFromConfig(latentHeight / p * (latentWidth / p));
        }
        s.SetTimesteps(numInferenceSteps, mu);
        return s;
    }

    /// <summary>x_T for one seed: torch.randn on a CPU generator, as diffusers' randn_tensor draws it per generator.</summary>
    public Tensor PriorNoiseFromSeed(long seed, int height, int width)
    {
        var gen = new Generator((ulong)seed, CPU);
        return randn([LatentChannels, height / VaeScaleFactor, width / VaeScaleFactor], dtype: ScalarType.Float32, generator: gen);
    }

    public IReadOnlyList<GeneratedSample> Generate(GenerationOptions o, Action<StepProgress>? onStep, CancellationToken ct)
        => Generate(o, onStep, ct, null);

    /// <param name="onStepEnd">debug hook like diffusers' callback_on_step_end: (step index, latents, raw transformer output).</param>
    public IReadOnlyList<GeneratedSample> Generate(GenerationOptions o, Action<StepProgress>? onStep, CancellationToken ct,
        Action<int, Tensor, Tensor>? onStepEnd)
    {
        int n = o.NumImages;
        int h = o.Height / VaeScaleFactor, w = o.Width / VaeScaleFactor;
        var seeds = new long[n];
        var noises = new Tensor[n];
        for (int i = 0; i < n; i++)
        {
            seeds[i] = o.Seeds is { Count: > 0 } ? o.Seeds[i] : 0;
            noises[i] = o.PriorNoise is { Count: > 0 }
                ? o.PriorNoise[i].to(ScalarType.Float32, copy: true)
                : PriorNoiseFromSeed(seeds[i], o.Height, o.Width);
        }
        bool cfg = o.GuidanceScale > 1.0;

        var pos = EncodePrompt(Enumerable.Repeat(o.Prompt, n).ToArray());
        Tensor promptEmbeds = pos.PromptEmbeds, pooled = pos.PooledPromptEmbeds;
        if (cfg)
        {
            var neg = EncodePrompt(Enumerable.Repeat(o.NegativePrompt ?? "", n).ToArray());
            promptEmbeds = cat([neg.PromptEmbeds, promptEmbeds], 0);
            pooled = cat([neg.PooledPromptEmbeds, pooled], 0);
        }

        var latents = stack(noises, 0).to(Device).to(DType);
        var scheduler = CreateScheduler(o.NumInferenceSteps, h, w);
        var timesteps = scheduler.Timesteps;
        for (int i = 0; i < timesteps.Count; i++)
        {
            ct.ThrowIfCancellationRequested();
            using var stepScope = NewDisposeScope();
            var input = cfg ? cat([latents, latents], 0) : latents;
            var t = full([input.shape[0]], timesteps[i], dtype: DType, device: Device);
            var noisePred = Transformer.forward(input, promptEmbeds, pooled, t);
            var raw = noisePred;
            if (cfg)
            {
                var chunks = noisePred.chunk(2, 0);
                noisePred = chunks[0] + o.GuidanceScale * (chunks[1] - chunks[0]);
            }
            var next = scheduler.StepAt(i, noisePred, latents).to(DType);
            onStepEnd?.Invoke(i, next, raw);
            latents.Dispose();
            latents = next.MoveToOuterDisposeScope();
            onStep?.Invoke(new StepProgress(i + 1, timesteps.Count, timesteps[i]));
        }
        ct.ThrowIfCancellationRequested();

        var images = DecodeLatents(latents);
        var result = new List<GeneratedSample>(n);
        for (int i = 0; i < n; i++)
            result.Add(new GeneratedSample
            {
                Index = i,
                Seed = seeds[i],
                PriorNoise = noises[i].DetachFromDisposeScope(),
                Latents = latents[i].to(ScalarType.Float32).cpu().DetachFromDisposeScope(),
                Image = images[i].to(ScalarType.Float32).cpu().DetachFromDisposeScope(),
            });
        return result;
    }

    /// <summary>VAE un-scaling + decode + postprocess to [0,1] (diffusers VaeImageProcessor 'pt').</summary>
    public Tensor DecodeLatents(Tensor latents)
    {
        var z = latents / Vae.ScalingFactor + Vae.ShiftFactor;
        var decoded = Vae.Decode(z);
        return (decoded / 2 + 0.5).clamp(0, 1);
    }

    public void Dispose()
    {
        Transformer.Dispose(); Vae.Dispose(); TextEncoder.Dispose(); TextEncoder2.Dispose();
    }
}
