using RealAlign.Core.Lora;
using RealAlign.Core.Pipelines;
using RealAlign.Server.Backbones;
using RealAlign.V1;

namespace RealAlign.Server.Services;

/// <summary>
/// Tells the adapter registry about the served backbones: the first adapter call for a backbone
/// (after it has loaded) registers its adaptable linear layers, device and dtype.
/// </summary>
public sealed class AdapterBackboneBinder(BackboneRegistry backbones, AdapterRegistry adapters)
{
    private readonly object _gate = new();

    public AdapterRegistry Adapters => adapters;

    /// <summary>The adapter-side description of a served backbone; an empty name means the only one served.</summary>
    public async Task<AdapterBackbone> EnsureAsync(string? name, CancellationToken ct)
    {
        if (string.IsNullOrEmpty(name))
        {
            var names = backbones.Names.ToList();
            if (names.Count != 1)
                throw new InvalidRequestException($"backbone: name one of {string.Join(", ", names)}");
            name = names[0];
        }
        if (adapters.TryGetBackbone(name, out var known)) return known;
        await backbones.WaitUntilLoadedAsync(name, ct);
        return Ensure(backbones.Get(name));
    }

    public AdapterBackbone Ensure(Backbone backbone)
    {
        if (adapters.TryGetBackbone(backbone.Name, out var known)) return known;
        lock (_gate)
        {
            if (adapters.TryGetBackbone(backbone.Name, out known)) return known;
            var bb = backbone.Pipeline switch
            {
                // Module enumeration only reads the module tree, so it may run beside a forward on the device thread.
                StableDiffusion3Pipeline p => new AdapterBackbone(backbone.Name, LoraTargetSet.FromModule(p.Transformer, p.Family), p.Device, p.DType),
                var p => throw new UnsupportedFeatureException($"adapters: backbone '{backbone.Name}' ({p.Family}) has no LoRA-adaptable layers"),
            };
            adapters.RegisterBackbone(bb);
            return bb;
        }
    }

    public static AdapterInfo ToInfo(AdapterVersion v)
    {
        var w = v.Weights;
        var info = new AdapterInfo
        {
            Name = v.Name,
            Version = (ulong)v.Version,
            Backbone = v.Backbone,
            Format = v.Format,
            Rank = (uint)v.Rank,
            LoraAlpha = w.Modules.Values.GroupBy(m => m.Alpha).OrderByDescending(g => g.Count()).First().Key,
            UseRslora = w.UseRsLora,
            Source = v.Source,
            Sha256 = v.Sha256,
            ByteSize = (ulong)v.ByteSize,
            ParameterBytes = (ulong)w.ParameterBytes,
            LoadedAtUnixMs = v.LoadedAt.ToUnixTimeMilliseconds(),
        };
        info.Targets.AddRange(v.Targets);
        return info;
    }
}
