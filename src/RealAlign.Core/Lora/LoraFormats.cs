using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using RealAlign.Core.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Lora;

/// <summary>
/// An adapter file that cannot be used as given. <see cref="Problems"/> lists every problem found
/// (each names the key or module, expected vs actual), so one round trip fixes them all.
/// </summary>
public sealed class LoraFormatException : Exception
{
    public IReadOnlyList<string> Problems { get; }

    public LoraFormatException(string message) : base(message) => Problems = [message];

    public LoraFormatException(string source, IReadOnlyList<string> problems)
        : base($"{source}: {problems.Count} problem(s): {string.Join("; ", problems.Take(20))}{(problems.Count > 20 ? $"; ... and {problems.Count - 20} more" : "")}")
        => Problems = problems;
}

public sealed record LoraLoadOptions
{
    /// <summary>Largest rank accepted (a serving limit: memory and per-step cost grow with r).</summary>
    public int MaxRank { get; init; } = 256;
    /// <summary>Expected format (<c>diffusers</c>, <c>peft</c>, <c>kohya</c>); null detects it.</summary>
    public string? Format { get; init; }
}

/// <summary>One adapted module's keys in a file, as a key converter resolved them.</summary>
public sealed record LoraKeyEntry(string Path, string AKey, string BKey, string? AlphaKey);

/// <summary>Result of mapping a file's keys to module paths: entries plus problems (unknown keys, ...).</summary>
public sealed record LoraKeyMap(IReadOnlyList<LoraKeyEntry> Entries, IReadOnlyList<string> Problems);

/// <summary>
/// Maps a non-diffusers key layout (kohya's <c>lora_unet_*</c>, ...) onto module paths of one
/// backbone family. diffusers keeps such converters per pipeline (loaders/lora_conversion_utils.py);
/// here they register per family so a new backbone brings its own.
/// </summary>
public interface ILoraKeyConverter
{
    string Family { get; }
    /// <summary>Format name reported for adapters it reads (e.g. <c>kohya</c>).</summary>
    string Format { get; }
    bool Recognizes(IReadOnlyCollection<string> keys);
    LoraKeyMap Map(IReadOnlyCollection<string> keys, LoraTargetSet target);
}

public static class LoraKeyConverters
{
    private static readonly object Gate = new();
    private static List<ILoraKeyConverter> _converters = [new KohyaKeyConverter("sd3")];

    public static void Register(ILoraKeyConverter converter)
    {
        lock (Gate) _converters = [.. _converters, converter];
    }

    public static ILoraKeyConverter? Find(string family, IReadOnlyCollection<string> keys) =>
        _converters.FirstOrDefault(c => c.Family == family && c.Recognizes(keys));

    public static IEnumerable<ILoraKeyConverter> All => _converters;
}

/// <summary>
/// kohya-ss (sd-scripts) layout: <c>lora_unet_&lt;path with '.' → '_'&gt;.lora_down.weight</c> [r, in]
/// (= lora_A), <c>.lora_up.weight</c> [out, r] (= lora_B), optional scalar <c>.alpha</c> (scale
/// alpha / r; absent → alpha = r). Underscores are ambiguous (<c>to_out_0</c> vs <c>to_out.0</c>), so
/// a name is resolved by matching it against the backbone's own linear paths written the same way.
/// </summary>
public sealed class KohyaKeyConverter(string family) : ILoraKeyConverter
{
    public const string UnetPrefix = "lora_unet_";
    public string Family { get; } = family;
    public string Format => "kohya";

    public bool Recognizes(IReadOnlyCollection<string> keys) =>
        keys.Any(k => k.StartsWith(UnetPrefix, StringComparison.Ordinal) || k.StartsWith("lora_te", StringComparison.Ordinal));

    public LoraKeyMap Map(IReadOnlyCollection<string> keys, LoraTargetSet target)
    {
        var byUnderscored = target.Linears.Keys.GroupBy(p => p.Replace('.', '_'), StringComparer.Ordinal)
            .ToDictionary(g => g.Key, g => g.ToList(), StringComparer.Ordinal);
        var problems = new List<string>();
        var groups = new Dictionary<string, (string? Down, string? Up, string? Alpha)>(StringComparer.Ordinal);
        foreach (var key in keys)
        {
            if (key.StartsWith("lora_te", StringComparison.Ordinal))
            {
                problems.Add($"'{key}': text-encoder LoRA is not supported (only the {Family} backbone is adapted)");
                continue;
            }
            if (!key.StartsWith(UnetPrefix, StringComparison.Ordinal)) { problems.Add($"'{key}': not a kohya '{UnetPrefix}*' key"); continue; }
            var rest = key[UnetPrefix.Length..];
            string? kind = null;
            foreach (var suffix in new[] { ".lora_down.weight", ".lora_up.weight", ".alpha" })
                if (rest.EndsWith(suffix, StringComparison.Ordinal)) { kind = suffix; rest = rest[..^suffix.Length]; break; }
            if (kind is null)
            {
                problems.Add(rest.EndsWith(".dora_scale", StringComparison.Ordinal)
                    ? $"'{key}': DoRA is not supported" : $"'{key}': unrecognised kohya key (expected .lora_down.weight, .lora_up.weight or .alpha)");
                continue;
            }
            groups.TryGetValue(rest, out var g);
            groups[rest] = kind switch
            {
                ".lora_down.weight" => g with { Down = key },
                ".lora_up.weight" => g with { Up = key },
                _ => g with { Alpha = key },
            };
        }
        var entries = new List<LoraKeyEntry>();
        foreach (var (name, g) in groups.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            if (!byUnderscored.TryGetValue(name, out var paths))
            {
                problems.Add($"'{UnetPrefix}{name}': no linear layer of {Family} is named like that");
                continue;
            }
            if (paths.Count > 1)
            {
                problems.Add($"'{UnetPrefix}{name}': ambiguous, matches {string.Join(" and ", paths)}");
                continue;
            }
            if (g.Down is null || g.Up is null)
            {
                problems.Add($"'{UnetPrefix}{name}': has {(g.Down is null ? "no lora_down" : "no lora_up")}");
                continue;
            }
            entries.Add(new LoraKeyEntry(paths[0], g.Down, g.Up, g.Alpha));
        }
        return new LoraKeyMap(entries, problems);
    }
}

/// <summary>
/// Reads and writes LoRA adapters in the layouts diffusers and peft use.
///
/// Key and scaling conventions (what diffusers/peft write and read):
/// <list type="bullet">
/// <item>diffusers (<c>pytorch_lora_weights.safetensors</c>, StableDiffusion3Pipeline.save_lora_weights):
///   <c>transformer.&lt;module path&gt;.lora_A.weight</c> [r, in] and <c>.lora_B.weight</c> [out, r];
///   <c>__metadata__ = {"format": "pt"}</c>. diffusers ≥ 0.34 adds <c>__metadata__["lora_adapter_metadata"]</c>,
///   the JSON (indent 2, sorted keys) of the LoraConfig dict with every key prefixed by the component
///   (<c>"transformer.r"</c>, <c>"transformer.lora_alpha"</c>, ...; lora_base._pack_dict_with_prefix);
///   ModelMixin.save_lora_adapter writes the same without prefixes, and unprefixed tensor keys.
///   Without that metadata diffusers (loaders/peft.py + utils/peft_utils.get_peft_kwargs) sets
///   <c>r</c> = the most common rank, <c>lora_alpha</c> = the rank of the first lora_B key, i.e. alpha = r
///   when ranks agree, scaling 1.</item>
/// <item>peft (<c>adapter_config.json</c> + <c>adapter_model.safetensors</c>, PeftModel.save_pretrained):
///   keys <c>base_model.model.&lt;module path&gt;.lora_A.weight</c>; r, lora_alpha, use_rslora,
///   rank_pattern and alpha_pattern from the config; scaling lora_alpha / r (or / sqrt(r)).</item>
/// <item>kohya: see <see cref="KohyaKeyConverter"/>.</item>
/// </list>
/// </summary>
public static class LoraFormats
{
    public const string DiffusersWeightName = "pytorch_lora_weights.safetensors";
    public const string PeftConfigName = "adapter_config.json";
    public const string PeftWeightName = "adapter_model.safetensors";
    /// <summary>diffusers loaders/lora_base.py LORA_ADAPTER_METADATA_KEY.</summary>
    public const string DiffusersMetadataKey = "lora_adapter_metadata";
    public const string DiffusersPrefix = "transformer";
    public const string PeftPrefix = "base_model.model.";

    public static readonly string[] KnownFormats = ["diffusers", "peft", "kohya"];

    /// <summary>Where the files of an adapter at a path are, and which format they are in.</summary>
    public sealed record Located(string Format, string WeightsFile, string? ConfigFile);

    /// <summary>
    /// Finds the adapter files at <paramref name="path"/> (a folder or a file) and detects the format:
    /// a folder with adapter_config.json is peft, one with pytorch_lora_weights.safetensors diffusers,
    /// otherwise the single .safetensors in it; a file's keys decide (<c>base_model.model.</c> → peft,
    /// <c>lora_unet_</c> → kohya, else diffusers).
    /// </summary>
    public static Located Locate(string path)
    {
        if (Directory.Exists(path))
        {
            var cfg = System.IO.Path.Combine(path, PeftConfigName);
            var peftWeights = System.IO.Path.Combine(path, PeftWeightName);
            if (File.Exists(cfg))
            {
                if (File.Exists(peftWeights)) return new("peft", peftWeights, cfg);
                if (File.Exists(System.IO.Path.Combine(path, "adapter_model.bin")))
                    throw new LoraFormatException($"{path}: only adapter_model.bin (a pickle) is present; RealAlign never unpickles, save with safe_serialization=True");
                throw new LoraFormatException($"{path}: has {PeftConfigName} but no {PeftWeightName}");
            }
            var diff = System.IO.Path.Combine(path, DiffusersWeightName);
            if (File.Exists(diff)) return LocateFile(diff);
            var candidates = Directory.GetFiles(path, "*.safetensors");
            if (candidates.Length == 1) return LocateFile(candidates[0]);
            if (candidates.Length > 1)
                throw new LoraFormatException($"{path}: {candidates.Length} .safetensors files ({string.Join(", ", candidates.Select(System.IO.Path.GetFileName))}); name the file to load");
            if (Directory.GetFiles(path, "*.bin").Length > 0)
                throw new LoraFormatException($"{path}: only .bin (pickle) weights; RealAlign never unpickles, convert them to safetensors");
            throw new LoraFormatException($"{path}: no adapter found (expected {DiffusersWeightName}, or {PeftConfigName} + {PeftWeightName})");
        }
        if (File.Exists(path))
        {
            if (System.IO.Path.GetFileName(path) == PeftConfigName) return Locate(System.IO.Path.GetDirectoryName(path)!);
            if (!path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
                throw new LoraFormatException($"{path}: not a .safetensors file (pickled .bin/.pt/.ckpt files are never loaded)");
            return LocateFile(path);
        }
        throw new LoraFormatException($"{path}: no such file or folder");
    }

    private static Located LocateFile(string file)
    {
        using var st = OpenSafeTensors(file);
        var keys = st.Tensors.Keys.ToList();
        if (keys.Any(k => k.StartsWith(PeftPrefix, StringComparison.Ordinal)))
        {
            var cfg = System.IO.Path.Combine(System.IO.Path.GetDirectoryName(file)!, PeftConfigName);
            return new("peft", file, File.Exists(cfg) ? cfg : null);
        }
        if (keys.Any(k => k.StartsWith(KohyaKeyConverter.UnetPrefix, StringComparison.Ordinal) || k.StartsWith("lora_te", StringComparison.Ordinal)))
            return new("kohya", file, null);
        return new("diffusers", file, null);
    }

    private static SafeTensorsFile OpenSafeTensors(string file)
    {
        try { return SafeTensorsFile.Open(file); }
        catch (SafeTensorsFormatException e) { throw new LoraFormatException($"corrupt or truncated safetensors: {e.Message}"); }
        catch (IOException e) { throw new LoraFormatException($"{file}: cannot read ({e.Message})"); }
    }

    /// <summary>Loads the adapter at a file or folder (format detected) and validates it against <paramref name="target"/>.</summary>
    public static LoraWeights Load(string path, LoraTargetSet target, LoraLoadOptions? options = null)
    {
        options ??= new LoraLoadOptions();
        var loc = Locate(path);
        if (options.Format is { } want && !string.Equals(want, loc.Format, StringComparison.OrdinalIgnoreCase))
            throw new LoraFormatException($"{path}: declared format '{want}' but the files are {loc.Format} format");
        return loc.Format switch
        {
            "peft" => LoadPeft(loc.WeightsFile, loc.ConfigFile, target, options),
            "kohya" => LoadConverted(loc.WeightsFile, target, options),
            _ => LoadDiffusers(loc.WeightsFile, target, options),
        };
    }

    /// <summary>diffusers layout; alpha from <c>lora_adapter_metadata</c> when present (diffusers ≥ 0.34), else alpha = r.</summary>
    public static LoraWeights LoadDiffusers(string file, LoraTargetSet target, LoraLoadOptions? options = null)
    {
        options ??= new LoraLoadOptions();
        using var st = OpenSafeTensors(file);
        var keys = st.Tensors.Keys.ToList();
        var prefixed = keys.Any(k => k.StartsWith(DiffusersPrefix + ".", StringComparison.Ordinal));
        var map = MapLoraAB(keys, prefixed ? DiffusersPrefix + "." : "", target,
            prefixed ? $"'{DiffusersPrefix}.'" : "no prefix");
        LoraConfig? meta = ReadDiffusersMetadata(st, file, prefixed);
        Func<LoraKeyEntry, double> alphaOf;
        bool useRsLora = meta?.UseRsLora ?? false;
        if (meta is not null) alphaOf = e => meta.RankAndAlpha(e.Path).Alpha;
        else
        {
            // get_peft_kwargs: lora_alpha = rank of the first lora_B in key order (file keys sorted, as
            // safetensors returns them), the same for every module; = r when all ranks agree.
            var first = map.Entries.OrderBy(e => e.BKey, StringComparer.Ordinal).FirstOrDefault();
            double alpha0 = first is null ? 0 : st.Tensors[first.BKey].Shape is { Length: 2 } s ? s[1] : 0;
            alphaOf = e => e.AlphaKey is not null ? ReadScalar(st, e.AlphaKey) : alpha0;
        }
        return Build(st, file, null, "diffusers", map, target, options, alphaOf, meta, useRsLora,
            meta?.BaseModelNameOrPath, meta?.TargetModules);
    }

    /// <summary>peft layout: weights keyed <c>base_model.model.*</c>, r/alpha from adapter_config.json (or the file's metadata).</summary>
    public static LoraWeights LoadPeft(string weightsFile, string? configFile, LoraTargetSet target, LoraLoadOptions? options = null)
    {
        options ??= new LoraLoadOptions();
        using var st = OpenSafeTensors(weightsFile);
        LoraConfig cfg;
        if (configFile is not null)
        {
            JsonObject o;
            try { o = JsonNode.Parse(File.ReadAllText(configFile))?.AsObject() ?? throw new JsonException("empty"); }
            catch (Exception e) when (e is JsonException or InvalidOperationException)
            { throw new LoraFormatException($"{configFile}: not valid JSON ({e.Message})"); }
            cfg = ParseConfig(o, configFile);
        }
        else cfg = ReadDiffusersMetadata(st, weightsFile, prefixed: false)
                   ?? throw new LoraFormatException($"{weightsFile}: peft weights ('{PeftPrefix}*' keys) without {PeftConfigName} next to them nor '{DiffusersMetadataKey}' metadata; alpha and r are unknown");
        var map = MapLoraAB(st.Tensors.Keys.ToList(), PeftPrefix, target, $"'{PeftPrefix}'");
        return Build(st, weightsFile, configFile, "peft", map, target, options, e => cfg.RankAndAlpha(e.Path).Alpha, cfg, cfg.UseRsLora,
            cfg.BaseModelNameOrPath, cfg.TargetModulesRegex is { } rx ? [rx] : cfg.TargetModules);
    }

    /// <summary>A layout handled by a registered <see cref="ILoraKeyConverter"/> for the target's family.</summary>
    public static LoraWeights LoadConverted(string file, LoraTargetSet target, LoraLoadOptions? options = null)
    {
        options ??= new LoraLoadOptions();
        using var st = OpenSafeTensors(file);
        var keys = st.Tensors.Keys.ToList();
        var conv = LoraKeyConverters.Find(target.Family, keys)
                   ?? throw new LoraFormatException($"{file}: kohya-style keys, but no key converter is registered for backbone family '{target.Family}'");
        var map = conv.Map(keys, target);
        return Build(st, file, null, conv.Format, map, target, options,
            e => e.AlphaKey is not null ? ReadScalar(st, e.AlphaKey) : st.Tensors[e.AKey].Shape[0], null, false, null, null);
    }

    private static LoraConfig ParseConfig(JsonObject o, string source)
    {
        try { return LoraConfig.FromJson(o, source); }
        catch (LoraFormatException) { throw; }
        catch (Exception e) when (e is InvalidOperationException or FormatException or JsonException)
        { throw new LoraFormatException($"{source}: bad LoRA config ({e.Message})"); }
    }

    /// <summary>
    /// diffusers ≥ 0.34 metadata. Pipeline-level saves prefix each key with the component
    /// (<c>transformer.r</c>); model-level saves (and peft-style files) do not.
    /// </summary>
    private static LoraConfig? ReadDiffusersMetadata(SafeTensorsFile st, string file, bool prefixed)
    {
        if (!st.Metadata.TryGetValue(DiffusersMetadataKey, out var raw)) return null;
        JsonObject o;
        try { o = JsonNode.Parse(raw)?.AsObject() ?? throw new JsonException("null"); }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        { throw new LoraFormatException($"{file}: __metadata__['{DiffusersMetadataKey}'] is not a JSON object ({e.Message})"); }
        var pre = DiffusersPrefix + ".";
        if (o.Any(kv => kv.Key.StartsWith(pre, StringComparison.Ordinal)))
        {
            var stripped = new JsonObject();
            foreach (var (k, v) in o)
                if (k.StartsWith(pre, StringComparison.Ordinal)) stripped[k[pre.Length..]] = v?.DeepClone();
            o = stripped;
        }
        if (o["r"] is null) return null; // metadata of another component only (e.g. text encoders)
        return ParseConfig(o, $"{file} ({DiffusersMetadataKey})");
    }

    private static double ReadScalar(SafeTensorsFile st, string key)
    {
        using var t = st.Load(key);
        if (t.numel() != 1) throw new LoraFormatException($"{st.Path}: '{key}' should be a scalar but has shape [{string.Join(",", t.shape)}]");
        return t.to_type(ScalarType.Float64).item<double>();
    }

    /// <summary>Groups <c>&lt;prefix&gt;&lt;path&gt;.lora_A.weight</c> / <c>.lora_B.weight</c> (/ <c>.alpha</c>) keys per module path.</summary>
    private static LoraKeyMap MapLoraAB(IReadOnlyCollection<string> keys, string prefix, LoraTargetSet target, string prefixDescription)
    {
        var problems = new List<string>();
        var groups = new Dictionary<string, (string? A, string? B, string? Alpha)>(StringComparer.Ordinal);
        foreach (var key in keys.OrderBy(k => k, StringComparer.Ordinal))
        {
            if (!key.StartsWith(prefix, StringComparison.Ordinal))
            {
                problems.Add(key.StartsWith("text_encoder", StringComparison.Ordinal)
                    ? $"'{key}': text-encoder LoRA is not supported (only the {target.Family} backbone is adapted)"
                    : $"'{key}': unexpected key (keys should start with {prefixDescription})");
                continue;
            }
            var rest = key[prefix.Length..];
            if (rest.EndsWith(".lora_A.weight", StringComparison.Ordinal))
                Set(rest[..^".lora_A.weight".Length], a: key);
            else if (rest.EndsWith(".lora_B.weight", StringComparison.Ordinal))
                Set(rest[..^".lora_B.weight".Length], b: key);
            else if (rest.EndsWith(".alpha", StringComparison.Ordinal))
                Set(rest[..^".alpha".Length], alpha: key);
            else if (rest.EndsWith(".lora_B.bias", StringComparison.Ordinal))
                problems.Add($"'{key}': LoRA bias (peft lora_bias=True) is not supported");
            else if (rest.Contains("lora_magnitude_vector", StringComparison.Ordinal) || rest.EndsWith("dora_scale", StringComparison.Ordinal))
                problems.Add($"'{key}': DoRA is not supported");
            else
                problems.Add($"'{key}': unrecognised key (expected <module>.lora_A.weight / <module>.lora_B.weight)");
        }
        var entries = new List<LoraKeyEntry>();
        foreach (var (path, g) in groups)
        {
            if (g.A is null || g.B is null)
            {
                problems.Add($"'{path}': has {(g.A is null ? "lora_B but no lora_A" : "lora_A but no lora_B")}");
                continue;
            }
            entries.Add(new LoraKeyEntry(path, g.A, g.B, g.Alpha));
        }
        return new LoraKeyMap(entries, problems);

        void Set(string path, string? a = null, string? b = null, string? alpha = null)
        {
            groups.TryGetValue(path, out var g);
            groups[path] = (a ?? g.A, b ?? g.B, alpha ?? g.Alpha);
        }
    }

    /// <summary>
    /// Checks every mapped module against the backbone (path exists, A [r, in], B [out, r], r agrees
    /// with the config, r ≤ max, float dtype), then reads the tensors and checks they are finite.
    /// All problems are gathered into one <see cref="LoraFormatException"/>.
    /// </summary>
    private static LoraWeights Build(SafeTensorsFile st, string weightsFile, string? configFile, string format, LoraKeyMap map,
        LoraTargetSet target, LoraLoadOptions options, Func<LoraKeyEntry, double> alphaOf, LoraConfig? config, bool useRsLora,
        string? baseModel, IReadOnlyList<string>? sourceTargets)
    {
        var problems = new List<string>(map.Problems);
        var unknown = new List<string>();
        foreach (var e in map.Entries)
        {
            var ai = st.Tensors[e.AKey];
            var bi = st.Tensors[e.BKey];
            if (!target.Linears.TryGetValue(e.Path, out var shape)) { unknown.Add(e.Path); continue; }
            foreach (var info in new[] { ai, bi })
                if (info.DType is not ("F32" or "F16" or "BF16" or "F64"))
                    problems.Add($"'{info.Name}': dtype {info.DType} is not a float type");
            if (ai.Shape.Length != 2 || bi.Shape.Length != 2)
            {
                problems.Add($"'{e.Path}': lora_A [{string.Join(",", ai.Shape)}] and lora_B [{string.Join(",", bi.Shape)}] must be 2-D (linear layers only)");
                continue;
            }
            long r = ai.Shape[0];
            if (ai.Shape[1] != shape.In)
                problems.Add($"'{e.AKey}': shape [{string.Join(",", ai.Shape)}] but {e.Path} has in_features {shape.In} (expected [{r},{shape.In}])");
            if (bi.Shape[0] != shape.Out)
                problems.Add($"'{e.BKey}': shape [{string.Join(",", bi.Shape)}] but {e.Path} has out_features {shape.Out} (expected [{shape.Out},{r}])");
            if (bi.Shape[1] != r)
                problems.Add($"'{e.Path}': rank mismatch, lora_A has r={r} but lora_B has r={bi.Shape[1]}");
            // peft injects layers by target_modules and then copies weights in; weights for a module the
            // config does not select would be dropped with a warning, so they are refused here.
            if (config is not null && (config.TargetModules.Count > 0 || config.TargetModulesRegex is not null) && !config.IsTarget(e.Path))
                problems.Add($"'{e.Path}': has weights but target_modules/exclude_modules of the config do not select it");
            if (config is not null && config.RankAndAlpha(e.Path).Rank != r)
                problems.Add($"'{e.Path}': rank mismatch, the config says r={config.RankAndAlpha(e.Path).Rank} (r / rank_pattern) but the weights have r={r}");
            if (r > options.MaxRank)
                problems.Add($"'{e.Path}': rank {r} exceeds the configured maximum {options.MaxRank}");
            if (r == 0) problems.Add($"'{e.Path}': rank 0");
        }
        if (unknown.Count > 0)
            problems.Add($"{unknown.Count} module(s) are not linear layers of this {target.Family} backbone: {string.Join(", ", unknown.Take(10))}{(unknown.Count > 10 ? ", ..." : "")}");
        if (map.Entries.Count == 0 && problems.Count == 0)
            problems.Add("no LoRA weights found in the file");
        if (problems.Count > 0) throw new LoraFormatException(weightsFile, problems);

        // Hashing the files is about as long as copying their tensors out; do both at once (hot-swap latency).
        var sourcePaths = configFile is null ? new[] { weightsFile } : [configFile, weightsFile];
        var describe = Task.Run(() => sourcePaths.Select(Describe).ToList());
        var modules = new List<LoraModule>();
        try
        {
            foreach (var e in map.Entries.OrderBy(e => e.Path, StringComparer.Ordinal))
            {
                double alpha = alphaOf(e);
                var a = st.Load(e.AKey).DetachFromDisposeScope();
                var b = st.Load(e.BKey).DetachFromDisposeScope();
                modules.Add(new LoraModule(e.Path, a, b, alpha));
                if (!double.IsFinite(alpha) || alpha <= 0) problems.Add($"'{e.Path}': alpha {alpha} is not a positive finite number");
                if (!AllFinite(a)) problems.Add($"'{e.AKey}': contains NaN or Inf");
                if (!AllFinite(b)) problems.Add($"'{e.BKey}': contains NaN or Inf");
            }
            if (problems.Count > 0) throw new LoraFormatException(weightsFile, problems);
        }
        catch
        {
            foreach (var m in modules) { m.A.Dispose(); m.B.Dispose(); }
            throw;
        }
        List<LoraSourceFile> files;
        try { files = describe.GetAwaiter().GetResult(); }
        catch
        {
            foreach (var m in modules) { m.A.Dispose(); m.B.Dispose(); }
            throw;
        }
        return new LoraWeights(modules, useRsLora)
        {
            Format = format,
            Files = files,
            BaseModelNameOrPath = baseModel,
            SourceTargetModules = sourceTargets,
        };
    }

    /// <summary>
    /// No NaN or ±Inf. float32 (the common case) is scanned in place with SIMD, several times faster
    /// than isfinite().all(), which matters for hot-swap latency; other dtypes go through torch.
    /// </summary>
    public static bool AllFinite(Tensor t)
    {
        if (t.dtype == ScalarType.Float32 && t.device_type == DeviceType.CPU && t.is_contiguous())
        {
            var xs = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(t.bytes);
            // x - x is 0 for finite x and NaN for NaN/±Inf, and NaN != 0.
            int i = 0;
            if (System.Numerics.Vector.IsHardwareAccelerated)
            {
                var vs = System.Runtime.InteropServices.MemoryMarshal.Cast<float, System.Numerics.Vector<float>>(xs);
                for (int k = 0; k < vs.Length; k++)
                    if (!System.Numerics.Vector.EqualsAll(vs[k] - vs[k], System.Numerics.Vector<float>.Zero)) return false;
                i = vs.Length * System.Numerics.Vector<float>.Count;
            }
            for (; i < xs.Length; i++)
                if (!float.IsFinite(xs[i])) return false;
            return true;
        }
        using var _ = NewDisposeScope();
        return t.isfinite().all().item<bool>();
    }

    public static LoraSourceFile Describe(string file)
    {
        using var fs = File.OpenRead(file);
        var hash = SHA256.HashData(fs);
        return new LoraSourceFile(System.IO.Path.GetFullPath(file), Convert.ToHexStringLower(hash), fs.Length);
    }

    // ---------------------------------------------------------------- export

    /// <summary>
    /// The peft LoraConfig fields that reproduce <paramref name="w"/>'s scaling: r and lora_alpha are
    /// the most common values, modules that differ go to rank_pattern / alpha_pattern keyed
    /// <c>^&lt;path&gt;</c> (anchored, as diffusers writes them, so <c>blocks.1</c> cannot match <c>blocks.11</c>);
    /// target_modules lists the exact module paths, so peft adapts exactly these layers.
    /// </summary>
    public static JsonObject LoraConfigJson(LoraWeights w)
    {
        var mods = w.Modules.Values.OrderBy(m => m.Path, StringComparer.Ordinal).ToList();
        long r = MostCommon(mods.Select(m => m.Rank));
        double alpha = MostCommon(mods.Select(m => m.Alpha));
        var rankPattern = new JsonObject();
        var alphaPattern = new JsonObject();
        foreach (var m in mods)
        {
            if (m.Rank != r) rankPattern["^" + m.Path] = m.Rank;
            if (m.Alpha != alpha) alphaPattern["^" + m.Path] = AlphaNode(m.Alpha);
        }
        return new JsonObject
        {
            ["alpha_pattern"] = alphaPattern,
            ["bias"] = "none",
            ["exclude_modules"] = null,
            ["fan_in_fan_out"] = false,
            ["init_lora_weights"] = true,
            ["layers_pattern"] = null,
            ["layers_to_transform"] = null,
            ["lora_alpha"] = AlphaNode(alpha),
            ["lora_bias"] = false,
            ["lora_dropout"] = 0.0,
            ["modules_to_save"] = null,
            ["peft_type"] = "LORA",
            ["r"] = r,
            ["rank_pattern"] = rankPattern,
            ["target_modules"] = new JsonArray(mods.Select(m => (JsonNode)JsonValue.Create(m.Path)!).ToArray()),
            ["use_dora"] = false,
            ["use_rslora"] = w.UseRsLora,
        };
    }

    // Integral alphas are written as ints, as peft configs usually carry them (lora_alpha: 8).
    private static JsonNode AlphaNode(double a) =>
        a == Math.Floor(a) && Math.Abs(a) < 1e15 ? JsonValue.Create((long)a) : JsonValue.Create(a);

    private static T MostCommon<T>(IEnumerable<T> xs) where T : notnull =>
        xs.GroupBy(x => x).OrderByDescending(g => g.Count()).First().Key; // ties: first seen (Counter.most_common)

    /// <summary>
    /// diffusers tensors: <c>transformer.&lt;path&gt;.lora_A.weight</c> / <c>.lora_B.weight</c>, in their stored dtype.
    /// With <paramref name="foldScalingIntoB"/> B is multiplied by alpha/r (or alpha/√r) and the
    /// metadata says alpha = r, so loaders that ignore the metadata (diffusers &lt; 0.34 uses alpha = r)
    /// get the same output; that is one float rounding per element, so it is off by default.
    /// </summary>
    public static (Dictionary<string, Tensor> Tensors, Dictionary<string, string> Metadata) DiffusersState(LoraWeights w, bool foldScalingIntoB = false)
    {
        var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        LoraWeights meta = w;
        var folded = new List<LoraModule>();
        foreach (var m in w.Modules.Values)
        {
            var b = m.B;
            if (foldScalingIntoB)
            {
                b = (m.B.to_type(ScalarType.Float64) * m.Scaling(w.UseRsLora)).to_type(m.B.dtype).DetachFromDisposeScope();
                folded.Add(new LoraModule(m.Path, m.A, b, m.Rank));
            }
            tensors[$"{DiffusersPrefix}.{m.Path}.lora_A.weight"] = m.A;
            tensors[$"{DiffusersPrefix}.{m.Path}.lora_B.weight"] = b;
        }
        if (foldScalingIntoB) meta = new LoraWeights(folded, useRsLora: false);
        var cfg = LoraConfigJson(meta);
        var packed = new SortedDictionary<string, JsonNode?>(StringComparer.Ordinal);
        foreach (var (k, v) in cfg) packed[$"{DiffusersPrefix}.{k}"] = v?.DeepClone();
        var metaJson = new JsonObject();
        foreach (var (k, v) in packed) metaJson[k] = v;
        var metadata = new Dictionary<string, string>
        {
            ["format"] = "pt",
            [DiffusersMetadataKey] = metaJson.ToJsonString(new JsonSerializerOptions { WriteIndented = true }),
        };
        return (tensors, metadata);
    }

    /// <summary>Writes <c>&lt;folder&gt;/pytorch_lora_weights.safetensors</c> (atomically) and returns its path.</summary>
    public static string SaveDiffusers(LoraWeights w, string folder, bool foldScalingIntoB = false)
    {
        var file = System.IO.Path.Combine(folder, DiffusersWeightName);
        var (tensors, metadata) = DiffusersState(w, foldScalingIntoB);
        try { SafeTensorsFile.Save(file, tensors, metadata); }
        finally { if (foldScalingIntoB) DisposeFolded(w, tensors); }
        return file;
    }

    /// <summary>Streams the diffusers file (same bytes as <see cref="SaveDiffusers"/>).</summary>
    public static void WriteDiffusers(LoraWeights w, Stream output, bool foldScalingIntoB = false)
    {
        var (tensors, metadata) = DiffusersState(w, foldScalingIntoB);
        try { SafeTensorsFile.Write(output, tensors, metadata); }
        finally { if (foldScalingIntoB) DisposeFolded(w, tensors); }
    }

    private static void DisposeFolded(LoraWeights w, Dictionary<string, Tensor> tensors)
    {
        foreach (var m in w.Modules.Values)
            if (tensors.TryGetValue($"{DiffusersPrefix}.{m.Path}.lora_B.weight", out var b) && !ReferenceEquals(b, m.B)) b.Dispose();
    }

    /// <summary>peft adapter_config.json (as PeftModel.save_pretrained writes it, plus base_model_name_or_path).</summary>
    public static string PeftConfigText(LoraWeights w, string? baseModelNameOrPath = null)
    {
        var cfg = LoraConfigJson(w);
        cfg["base_model_name_or_path"] = baseModelNameOrPath ?? w.BaseModelNameOrPath;
        cfg["inference_mode"] = true;
        cfg["task_type"] = null;
        cfg["revision"] = null;
        var sorted = new JsonObject();
        foreach (var (k, v) in cfg.OrderBy(kv => kv.Key, StringComparer.Ordinal)) sorted[k] = v?.DeepClone();
        return sorted.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
    }

    public static Dictionary<string, Tensor> PeftTensors(LoraWeights w)
    {
        var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var m in w.Modules.Values)
        {
            tensors[$"{PeftPrefix}{m.Path}.lora_A.weight"] = m.A;
            tensors[$"{PeftPrefix}{m.Path}.lora_B.weight"] = m.B;
        }
        return tensors;
    }

    /// <summary>Writes adapter_config.json and adapter_model.safetensors into <paramref name="folder"/>, each atomically.</summary>
    public static void SavePeft(LoraWeights w, string folder, string? baseModelNameOrPath = null)
    {
        Directory.CreateDirectory(folder);
        SafeTensorsFile.Save(System.IO.Path.Combine(folder, PeftWeightName), PeftTensors(w), new Dictionary<string, string> { ["format"] = "pt" });
        WriteAllTextAtomic(System.IO.Path.Combine(folder, PeftConfigName), PeftConfigText(w, baseModelNameOrPath));
    }

    public static void WritePeftWeights(LoraWeights w, Stream output) =>
        SafeTensorsFile.Write(output, PeftTensors(w), new Dictionary<string, string> { ["format"] = "pt" });

    /// <summary>Temp file in the same folder, then rename: readers see the old file or the new one, never half of one.</summary>
    public static void WriteAllTextAtomic(string path, string text)
    {
        var dir = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!;
        Directory.CreateDirectory(dir);
        var tmp = System.IO.Path.Combine(dir, $".{System.IO.Path.GetFileName(path)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            {
                fs.Write(new UTF8Encoding(false).GetBytes(text));
                fs.Flush(flushToDisk: true);
            }
            File.Move(tmp, path, overwrite: true);
        }
        finally { if (File.Exists(tmp)) File.Delete(tmp); }
    }
}
