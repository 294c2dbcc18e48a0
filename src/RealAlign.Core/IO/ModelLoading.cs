using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.IO;

/// <summary>Raised when a checkpoint does not fit the module built from its config.</summary>
public sealed class CheckpointMismatchException(string message) : Exception(message);

public static class ModelLoading
{
    public static readonly JsonSerializerOptions ConfigJson = new()
    {
        PropertyNameCaseInsensitive = false,
        ReadCommentHandling = JsonCommentHandling.Skip,
        AllowTrailingCommas = true,
        NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowReadingFromString,
    };

    /// <summary>Reads a config.json into a config record (unknown keys such as _class_name are ignored).</summary>
    public static T ReadConfig<T>(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"config not found: {path}");
        return JsonSerializer.Deserialize<T>(File.ReadAllText(path), ConfigJson)
               ?? throw new InvalidDataException($"{path}: empty config");
    }

    /// <summary>
    /// Copies checkpoint tensors into the module's parameters and buffers by their state-dict names
    /// (which mirror upstream names, so no mapping table is needed). With <paramref name="strict"/>,
    /// a missing or unexpected key or a shape mismatch is an error naming the key.
    /// </summary>
    public static void LoadStateDict(nn.Module module, SafeTensorsCheckpoint ck, bool strict = true,
        string prefix = "", IEnumerable<string>? ignoreMissing = null, Func<string, bool>? ignoreUnexpected = null)
    {
        var sd = module.state_dict();
        var ignore = new HashSet<string>(ignoreMissing ?? []);
        var missing = new List<string>();
        using var _ = no_grad();
        foreach (var (name, target) in sd)
        {
            var key = prefix + name;
            if (!ck.Contains(key))
            {
                if (!ignore.Contains(name)) missing.Add(key);
                continue;
            }
            var info = ck.Info(key);
            if (!info.Shape.SequenceEqual(target.shape))
                throw new CheckpointMismatchException($"'{key}': checkpoint shape [{string.Join(",", info.Shape)}] != model shape [{string.Join(",", target.shape)}]");
            using var src = ck.Load(key);
            target.copy_(src);
        }
        if (strict && missing.Count > 0)
            throw new CheckpointMismatchException($"checkpoint lacks {missing.Count} tensor(s) the model needs, e.g. {string.Join(", ", missing.Take(5))}");
        if (strict)
        {
            var unexpected = ck.Keys.Where(k => k.StartsWith(prefix, StringComparison.Ordinal) && !sd.ContainsKey(k[prefix.Length..]))
                .Where(k => ignoreUnexpected is null || !ignoreUnexpected(k)).ToList();
            if (unexpected.Count > 0)
                throw new CheckpointMismatchException($"checkpoint has {unexpected.Count} tensor(s) the model does not, e.g. {string.Join(", ", unexpected.Take(5))}");
        }
    }

    /// <summary>Deterministic random init for the embedded default backbones (no weights shipped).</summary>
    public static void DeterministicInit(nn.Module module, long seed, double std = 0.02)
    {
        using var _ = no_grad();
        var gen = new Generator((ulong)seed);
        foreach (var (name, p) in module.named_parameters())
        {
            if (name.EndsWith("bias", StringComparison.Ordinal)) p.normal_(0, std * 0.1, generator: gen);
            else if (p.dim() == 1) { p.fill_(1.0); p.add_(torch.randn(p.shape, generator: gen) * (std * 0.1)); }
            else
            {
                long fanIn = p.shape.Skip(1).Aggregate(1L, (a, b) => a * b);
                p.normal_(0, Math.Min(std * 10, 1.0 / Math.Sqrt(Math.Max(1, fanIn))), generator: gen);
            }
        }
    }
}
