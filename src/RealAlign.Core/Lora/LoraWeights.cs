using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using RealAlign.Core.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Lora;

/// <summary>
/// One adapted linear layer: <c>lora_A</c> [r, in] and <c>lora_B</c> [out, r] (peft's
/// <c>lora_A.weight</c>/<c>lora_B.weight</c>), and the alpha that sets its scaling.
/// </summary>
public sealed class LoraModule
{
    public string Path { get; }
    public Tensor A { get; }
    public Tensor B { get; }
    public double Alpha { get; }

    // Kept as plain numbers so descriptions of a version stay readable after its tensors are freed.
    public long Rank { get; }
    public long InFeatures { get; }
    public long OutFeatures { get; }
    /// <summary>Resident bytes of A and B.</summary>
    public long Bytes { get; }

    public LoraModule(string path, Tensor a, Tensor b, double alpha)
    {
        if (a.dim() != 2 || b.dim() != 2 || a.shape[0] != b.shape[1])
            throw new ArgumentException($"{path}: lora_A [{string.Join(",", a.shape)}] and lora_B [{string.Join(",", b.shape)}] do not form a rank-r pair");
        Path = path;
        A = a;
        B = b;
        Alpha = alpha;
        Rank = a.shape[0];
        InFeatures = a.shape[1];
        OutFeatures = b.shape[0];
        Bytes = a.NumberOfElements * a.ElementSize + b.NumberOfElements * b.ElementSize;
    }

    /// <summary>
    /// peft LoraLayer.update_layer: <c>lora_alpha / r</c>, or <c>lora_alpha / sqrt(r)</c> with
    /// use_rslora (Kalajdzievski 2023, rank-stabilised LoRA), computed in double as Python does.
    /// </summary>
    public double Scaling(bool useRsLora) => useRsLora ? Alpha / Math.Sqrt(Rank) : Alpha / Rank;
}

/// <summary>Where the weights of an adapter came from; kept for List/Get and exports.</summary>
public sealed record LoraSourceFile(string Path, string Sha256, long ByteSize);

/// <summary>
/// An adapter's weights: per target module path (e.g. <c>transformer_blocks.0.attn.to_q</c>, the
/// module's state-dict path in the backbone) an (A, B, alpha) triple, plus what is known about its
/// origin. CPU tensors, owned by this object (Dispose frees them).
/// </summary>
public sealed class LoraWeights : IDisposable
{
    private readonly Dictionary<string, LoraModule> _modules;
    private bool _disposed;

    public IReadOnlyDictionary<string, LoraModule> Modules => _modules;
    /// <summary>Scale alpha/sqrt(r) instead of alpha/r (peft <c>use_rslora</c>).</summary>
    public bool UseRsLora { get; }
    /// <summary>Format it was read from (<c>diffusers</c>, <c>peft</c>, <c>kohya</c>, or <c>memory</c>).</summary>
    public string Format { get; init; } = "memory";
    public IReadOnlyList<LoraSourceFile> Files { get; init; } = [];
    /// <summary>peft's <c>base_model_name_or_path</c> when the source named one.</summary>
    public string? BaseModelNameOrPath { get; init; }
    /// <summary>The source's target_modules (patterns) when it gave them; exports write exact paths instead.</summary>
    public IReadOnlyList<string>? SourceTargetModules { get; init; }

    public LoraWeights(IEnumerable<LoraModule> modules, bool useRsLora = false)
    {
        _modules = new Dictionary<string, LoraModule>(StringComparer.Ordinal);
        foreach (var m in modules)
            if (!_modules.TryAdd(m.Path, m)) throw new ArgumentException($"module '{m.Path}' appears twice");
        UseRsLora = useRsLora;
    }

    public IEnumerable<string> Targets => _modules.Keys.OrderBy(k => k, StringComparer.Ordinal);
    public long MaxRank => _modules.Count == 0 ? 0 : _modules.Values.Max(m => m.Rank);
    /// <summary>sha256 of the weights file (the safetensors), the adapter's content identity.</summary>
    public string Sha256 => Files.Count == 0 ? "" : Files[^1].Sha256;
    public long ByteSize => Files.Sum(f => f.ByteSize);
    public long ParameterBytes => _modules.Values.Sum(m => m.Bytes);

    public double Scaling(string path) => _modules[path].Scaling(UseRsLora);

    /// <summary>
    /// Fresh, trainable-style adapter on every linear of <paramref name="target"/> that
    /// <paramref name="config"/> selects (peft target_modules semantics), initialised as peft's
    /// LoraLayer.reset_lora_parameters does: B = 0 (so the adapter starts as the identity), A either
    /// kaiming-uniform with a = sqrt(5) (peft's default, <c>init_lora_weights=True</c>) or N(0, 1/r)
    /// (<c>init_lora_weights="gaussian"</c>).
    /// </summary>
    public static LoraWeights CreateInitialized(LoraTargetSet target, LoraConfig config, long seed, ScalarType dtype = ScalarType.Float32)
    {
        var gen = new Generator((ulong)seed);
        var modules = new List<LoraModule>();
        using var _ = no_grad();
        foreach (var (path, shape) in target.Linears.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            if (!config.IsTarget(path)) continue;
            var (r, alpha) = config.RankAndAlpha(path);
            var a = empty(r, shape.In, dtype: dtype);
            if (config.InitLoraWeights == LoraInit.Gaussian) a.normal_(0, 1.0 / r, generator: gen);
            else
            {
                // kaiming_uniform_(a=sqrt(5)) on [r, in]: bound = sqrt(6 / ((1 + 5) * fan_in)) = 1/sqrt(in).
                double bound = 1.0 / Math.Sqrt(shape.In);
                a.uniform_(-bound, bound, generator: gen);
            }
            var b = zeros(shape.Out, r, dtype: dtype);
            modules.Add(new LoraModule(path, a.DetachFromDisposeScope(), b.DetachFromDisposeScope(), alpha));
        }
        if (modules.Count == 0)
            throw new LoraFormatException($"target_modules [{string.Join(", ", config.TargetModules)}] select no linear layer of {target.Family}");
        return new LoraWeights(modules, config.UseRsLora) { SourceTargetModules = config.TargetModules };
    }

    /// <summary>Random A and B (both non-zero) for benchmarks and tests that need an adapter with an effect.</summary>
    public static LoraWeights CreateRandom(LoraTargetSet target, IEnumerable<string> paths, int rank, double alpha, long seed,
        double scaleB = 1.0, ScalarType dtype = ScalarType.Float32)
    {
        var gen = new Generator((ulong)seed);
        var modules = new List<LoraModule>();
        using var _ = no_grad();
        foreach (var path in paths)
        {
            if (!target.Linears.TryGetValue(path, out var shape)) throw new ArgumentException($"{target.Family} has no linear '{path}'");
            var a = (randn(rank, shape.In, generator: gen) / Math.Sqrt(shape.In)).to_type(dtype);
            var b = (randn(shape.Out, rank, generator: gen) * (scaleB / Math.Sqrt(rank))).to_type(dtype);
            modules.Add(new LoraModule(path, a.DetachFromDisposeScope(), b.DetachFromDisposeScope(), alpha));
        }
        return new LoraWeights(modules);
    }

    private readonly object _cacheGate = new();
    private volatile Dictionary<(DeviceType, int, ScalarType), Dictionary<string, (Tensor A, Tensor B)>> _deviceCopies = new();

    /// <summary>
    /// A and B on <paramref name="device"/> in <paramref name="dtype"/> (the layer's), made once per
    /// device/dtype for all modules together (so the first forward after a load pays for the whole
    /// upload, not a stall per layer) and kept until this object is disposed. On the CPU in the
    /// stored dtype these are the stored tensors themselves.
    /// </summary>
    public (Tensor A, Tensor B) DeviceCopy(string path, Device device, ScalarType dtype)
    {
        var key = (device.type, device.type == DeviceType.CPU ? -1 : device.index, dtype);
        if (!_deviceCopies.TryGetValue(key, out var copies)) copies = Materialize(key, device, dtype);
        return copies[path];
    }

    /// <summary>Makes the device copies ahead of the first forward (registry loads call this for the backbone's device).</summary>
    public void Prepare(Device device, ScalarType dtype) => DeviceCopy(_modules.Keys.First(), device, dtype);

    private Dictionary<string, (Tensor, Tensor)> Materialize((DeviceType, int, ScalarType) key, Device device, ScalarType dtype)
    {
        lock (_cacheGate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_deviceCopies.TryGetValue(key, out var existing)) return existing;
            var d = new Dictionary<string, (Tensor, Tensor)>(StringComparer.Ordinal);
            using (no_grad())
                foreach (var m in _modules.Values)
                {
                    bool same = device.type == DeviceType.CPU && m.A.dtype == dtype;
                    d[m.Path] = same ? (m.A, m.B)
                        : (m.A.to(dtype, device).DetachFromDisposeScope(), m.B.to(dtype, device).DetachFromDisposeScope());
                }
            // Copy-on-write so readers never lock.
            _deviceCopies = new Dictionary<(DeviceType, int, ScalarType), Dictionary<string, (Tensor A, Tensor B)>>(_deviceCopies) { [key] = d };
            return d;
        }
    }

    public void Dispose()
    {
        lock (_cacheGate)
        {
            if (_disposed) return;
            _disposed = true;
            foreach (var copies in _deviceCopies.Values)
                foreach (var (path, (a, b)) in copies)
                    if (!ReferenceEquals(a, _modules[path].A)) { a.Dispose(); b.Dispose(); }
            _deviceCopies = new();
            foreach (var m in _modules.Values) { m.A.Dispose(); m.B.Dispose(); }
        }
    }
}

/// <summary>The linear layers of a backbone an adapter may target: module path → (in, out) features.</summary>
public sealed class LoraTargetSet
{
    /// <summary>Backbone family (<c>sd3</c>, <c>flux</c>, <c>sd15</c>, ...): selects the kohya key converter.</summary>
    public string Family { get; }
    public IReadOnlyDictionary<string, (long In, long Out)> Linears { get; }
    /// <summary>
    /// The layer instances (when built from a model): a <see cref="LoraHook"/> scoped to them leaves
    /// other models' layers alone (text encoders and VAE run on the same thread and may share a path).
    /// </summary>
    public IReadOnlySet<LoRACompatibleLinear>? Layers { get; init; }

    public LoraTargetSet(string family, IReadOnlyDictionary<string, (long In, long Out)> linears)
    {
        Family = family;
        Linears = linears;
    }

    /// <summary>Every <see cref="LoRACompatibleLinear"/> of the model, by its state-dict path.</summary>
    public static LoraTargetSet FromModule(nn.Module model, string family)
    {
        var d = new Dictionary<string, (long, long)>(StringComparer.Ordinal);
        var layers = new HashSet<LoRACompatibleLinear>(ReferenceEqualityComparer.Instance);
        foreach (var (name, m) in model.named_modules())
            if (m is LoRACompatibleLinear l)
            {
                if (string.IsNullOrEmpty(l.Path)) l.Path = name;
                d[name] = (l.InFeatures, l.OutFeatures);
                layers.Add(l);
            }
        return new LoraTargetSet(family, d) { Layers = layers };
    }
}

public enum LoraInit { Kaiming, Gaussian }

/// <summary>
/// The subset of peft's LoraConfig (adapter_config.json) that decides which layers are adapted and
/// how they are scaled. Field names follow the JSON keys.
/// </summary>
public sealed record LoraConfig
{
    public int R { get; init; } = 8;
    public double LoraAlpha { get; init; } = 8;
    /// <summary>List form: exact names or dotted suffixes. See <see cref="TargetModulesRegex"/> for the string form.</summary>
    public IReadOnlyList<string> TargetModules { get; init; } = [];
    /// <summary>peft accepts a single string, matched as a full regex against the module path.</summary>
    public string? TargetModulesRegex { get; init; }
    public IReadOnlyList<string> ExcludeModules { get; init; } = [];
    public string? ExcludeModulesRegex { get; init; }
    public bool UseRsLora { get; init; }
    public IReadOnlyDictionary<string, int> RankPattern { get; init; } = new Dictionary<string, int>();
    public IReadOnlyDictionary<string, double> AlphaPattern { get; init; } = new Dictionary<string, double>();
    public double LoraDropout { get; init; }
    public LoraInit InitLoraWeights { get; init; } = LoraInit.Kaiming;
    public string? BaseModelNameOrPath { get; init; }

    /// <summary>
    /// peft check_target_module_exists (tuners_utils.py): a string is a regex that must match the
    /// whole path; a list entry matches the path itself or any path ending in "." + entry, so
    /// <c>to_q</c> adapts <c>attn.to_q</c> and <c>attn2.to_q</c> of SD3.5's dual-attention blocks while
    /// <c>attn.to_q</c> adapts only the former. <c>all-linear</c> selects every linear.
    /// </summary>
    public bool IsTarget(string path)
    {
        if (IsExcluded(path)) return false;
        if (TargetModulesRegex is { } rx) return Regex.IsMatch(path, $"^(?:{rx})$", RegexOptions.None, TimeSpan.FromSeconds(1));
        foreach (var t in TargetModules)
        {
            if (t == "all-linear") return true;
            if (MatchesSuffix(path, t)) return true;
        }
        return false;
    }

    private bool IsExcluded(string path)
    {
        if (ExcludeModulesRegex is { } rx) return Regex.IsMatch(path, $"^(?:{rx})$", RegexOptions.None, TimeSpan.FromSeconds(1));
        return ExcludeModules.Any(t => MatchesSuffix(path, t));
    }

    public static bool MatchesSuffix(string path, string name) =>
        path == name || path.EndsWith("." + name, StringComparison.Ordinal);

    /// <summary>
    /// peft LoraModel._create_and_replace: the first key of rank_pattern then alpha_pattern that
    /// matches <c>(.*\.)?key$</c> (a leading '^' anchors it at the start, as diffusers writes them)
    /// selects both r and alpha; unmatched modules use r and lora_alpha.
    /// </summary>
    public (int Rank, double Alpha) RankAndAlpha(string path)
    {
        string? key = RankPattern.Keys.Concat(AlphaPattern.Keys).FirstOrDefault(k => PatternMatches(k, path));
        int r = key is not null && RankPattern.TryGetValue(key, out var rr) ? rr : R;
        double a = key is not null && AlphaPattern.TryGetValue(key, out var aa) ? aa : LoraAlpha;
        return (r, a);
    }

    private static bool PatternMatches(string key, string path)
    {
        var pattern = key.StartsWith('^') ? $"{key}$" : $@"^(.*\.)?(?:{key})$";
        try { return Regex.IsMatch(path, pattern, RegexOptions.None, TimeSpan.FromSeconds(1)); }
        catch (ArgumentException) { return MatchesSuffix(path, key.TrimStart('^')); }
    }

    /// <summary>Reads peft's adapter_config.json (unknown keys ignored; only LORA is accepted).</summary>
    public static LoraConfig FromJson(JsonObject o, string source)
    {
        var peftType = o["peft_type"]?.ToString();
        if (peftType is not null && peftType != "LORA")
            throw new LoraFormatException($"{source}: peft_type is '{peftType}'; only LORA adapters are supported");
        if (o["use_dora"]?.GetValue<bool>() == true)
            throw new LoraFormatException($"{source}: use_dora is true; DoRA adapters are not supported");
        if (o["lora_bias"] is JsonValue lb && lb.GetValue<bool>())
            throw new LoraFormatException($"{source}: lora_bias is true; LoRA biases are not supported");
        if (o["fan_in_fan_out"] is JsonValue fi && fi.GetValue<bool>())
            throw new LoraFormatException($"{source}: fan_in_fan_out is true (Conv1D-style weights), which no RealAlign backbone has");
        if (o["r"] is null) throw new LoraFormatException($"{source}: no 'r'");
        var cfg = new LoraConfig
        {
            R = o["r"]!.GetValue<int>(),
            LoraAlpha = o["lora_alpha"]?.GetValue<double>() ?? 8, // peft's LoraConfig default
            UseRsLora = o["use_rslora"]?.GetValue<bool>() ?? false,
            LoraDropout = o["lora_dropout"]?.GetValue<double>() ?? 0,
            BaseModelNameOrPath = o["base_model_name_or_path"]?.ToString(),
            InitLoraWeights = o["init_lora_weights"]?.ToString() == "gaussian" ? LoraInit.Gaussian : LoraInit.Kaiming,
        };
        cfg = o["target_modules"] switch
        {
            JsonArray arr => cfg with { TargetModules = arr.Select(x => x!.ToString()).ToList() },
            JsonValue v when v.ToString() == "all-linear" => cfg with { TargetModules = ["all-linear"] },
            JsonValue v => cfg with { TargetModulesRegex = v.ToString() },
            _ => cfg,
        };
        cfg = o["exclude_modules"] switch
        {
            JsonArray arr => cfg with { ExcludeModules = arr.Select(x => x!.ToString()).ToList() },
            JsonValue v => cfg with { ExcludeModulesRegex = v.ToString() },
            _ => cfg,
        };
        if (o["rank_pattern"] is JsonObject rp)
            cfg = cfg with { RankPattern = rp.ToDictionary(kv => kv.Key, kv => kv.Value!.GetValue<int>()) };
        if (o["alpha_pattern"] is JsonObject ap)
            cfg = cfg with { AlphaPattern = ap.ToDictionary(kv => kv.Key, kv => kv.Value!.GetValue<double>()) };
        if (o["layers_to_transform"] is not null)
            throw new LoraFormatException($"{source}: layers_to_transform is not supported");
        return cfg;
    }
}
