using System.Collections.Immutable;
using System.Text.RegularExpressions;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Lora;

/// <summary>What went wrong, in terms a service maps onto a status code.</summary>
public enum AdapterErrorKind { NotFound, InvalidArgument, PermissionDenied, ResourceExhausted }

/// <summary>A registry request that cannot be honoured (unknown adapter or backbone, bad name, path outside the root, limits).</summary>
public sealed class AdapterException(AdapterErrorKind kind, string message) : Exception(message)
{
    public AdapterErrorKind Kind { get; } = kind;
}

public sealed record AdapterRegistryOptions
{
    /// <summary>Folder that Load paths are resolved in and confined to; null allows any path (library use).</summary>
    public string? AdaptersRoot { get; init; }
    public int MaxRank { get; init; } = 256;
    public int MaxAdapters { get; init; } = 64;
    /// <summary>Largest total size of the files of one uploaded adapter.</summary>
    public long MaxUploadBytes { get; init; } = 4L << 30;
}

/// <summary>A backbone adapters can be loaded for: its linear layers, and where its forward runs.</summary>
public sealed record AdapterBackbone(string Name, LoraTargetSet Targets, Device? Device = null, ScalarType? DType = null);

/// <summary>
/// One loaded version of a named adapter. Immutable; its tensors live until the registry has dropped
/// it (unload or replacement by a newer version) and every lease that captured it is disposed.
/// </summary>
public sealed class AdapterVersion
{
    private int _refs = 1; // the registry's reference

    public string Name { get; }
    /// <summary>1 for the first load of a name, +1 for every later load under it (hot swaps included).</summary>
    public long Version { get; }
    public string Backbone { get; }
    public string Source { get; }
    public DateTimeOffset LoadedAt { get; } = DateTimeOffset.UtcNow;
    public LoraWeights Weights { get; }

    public string Format => Weights.Format;
    public long Rank => Weights.MaxRank;
    public IEnumerable<string> Targets => Weights.Targets;
    public string Sha256 => Weights.Sha256;
    public long ByteSize => Weights.ByteSize;
    public bool IsReleased => Volatile.Read(ref _refs) == 0;

    internal AdapterVersion(string name, long version, string backbone, string source, LoraWeights weights)
    {
        Name = name;
        Version = version;
        Backbone = backbone;
        Source = source;
        Weights = weights;
    }

    /// <summary>Takes a reference unless the version has already been freed.</summary>
    internal bool TryAddRef()
    {
        while (true)
        {
            int r = Volatile.Read(ref _refs);
            if (r == 0) return false;
            if (Interlocked.CompareExchange(ref _refs, r + 1, r) == r) return true;
        }
    }

    internal void Release()
    {
        if (Interlocked.Decrement(ref _refs) == 0) Weights.Dispose();
    }

    public override string ToString() => $"{Name}@v{Version} ({Format}, r={Rank}, {Weights.Modules.Count} modules)";
}

/// <summary>
/// The adapter versions a request captured when it started. They stay valid (and unchanged) until
/// the lease is disposed, whatever loads, hot swaps or unloads happen meanwhile.
/// </summary>
public sealed class AdapterLease : IDisposable
{
    private AdapterVersion[]? _versions;

    internal AdapterLease(AdapterVersion[] versions) => _versions = versions;

    public IReadOnlyList<AdapterVersion> Versions => _versions ?? throw new ObjectDisposedException(nameof(AdapterLease));

    public AdapterVersion this[string name] => Versions.First(v => v.Name == name);

    /// <summary>
    /// A hook for a batch: <paramref name="rows"/>[i] lists (adapter name, scale) for batch row i
    /// (a name used twice in a row adds its scales). One row means: the same for every row.
    /// </summary>
    /// <param name="scope">the backbone's target set: layers of other models are left alone.</param>
    public LoraHook CreateHook(IReadOnlyList<IReadOnlyList<(string Name, double Scale)>> rows, LoraTargetSet? scope = null)
    {
        var adapters = new List<LoraHookAdapter>();
        foreach (var v in Versions)
        {
            var scales = new double[rows.Count];
            for (int i = 0; i < rows.Count; i++)
                foreach (var (n, s) in rows[i])
                    if (n == v.Name) scales[i] += s;
            adapters.Add(new LoraHookAdapter(v.Weights, scales));
        }
        return new LoraHook(adapters, scope);
    }

    /// <summary>Every leased adapter on every row, each with its scale.</summary>
    public LoraHook CreateHook(IReadOnlyList<(string Name, double Scale)> adapters, LoraTargetSet? scope = null) => CreateHook([adapters], scope);

    public void Dispose()
    {
        var vs = Interlocked.Exchange(ref _versions, null);
        if (vs is null) return;
        foreach (var v in vs) v.Release();
    }
}

/// <summary>
/// Resident adapters by name. Thread-safe: the name → version map is an immutable snapshot replaced
/// under a lock, so readers (requests acquiring leases) never block and never see a half-done change.
/// Loading parses and validates outside the lock and installs in one swap; a failed load (bad file,
/// limits) leaves the registry exactly as it was. Loading under an existing name is a hot swap:
/// requests that started before keep their version through their lease; the next request gets the
/// new one; the old version's memory is freed when its last lease ends.
/// </summary>
public sealed class AdapterRegistry : IDisposable
{
    private static readonly Regex NamePattern = new("^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", RegexOptions.Compiled);

    private readonly object _gate = new();
    private readonly Dictionary<string, long> _lastVersion = new(StringComparer.Ordinal);
    private volatile ImmutableDictionary<string, AdapterVersion> _current = ImmutableDictionary.Create<string, AdapterVersion>(StringComparer.Ordinal);
    private volatile ImmutableDictionary<string, AdapterBackbone> _backbones = ImmutableDictionary.Create<string, AdapterBackbone>(StringComparer.Ordinal);
    private bool _disposed;

    public AdapterRegistryOptions Options { get; }

    public AdapterRegistry(AdapterRegistryOptions? options = null) => Options = options ?? new AdapterRegistryOptions();

    public void RegisterBackbone(AdapterBackbone backbone)
    {
        lock (_gate) _backbones = _backbones.SetItem(backbone.Name, backbone);
    }

    public IReadOnlyCollection<AdapterBackbone> Backbones => _backbones.Values.ToList();

    public bool TryGetBackbone(string name, out AdapterBackbone backbone) => _backbones.TryGetValue(name, out backbone!);

    /// <summary>The named backbone; an empty name picks the only one registered.</summary>
    public AdapterBackbone GetBackbone(string? name)
    {
        var bbs = _backbones;
        if (string.IsNullOrEmpty(name))
        {
            if (bbs.Count == 1) return bbs.Values.First();
            throw new AdapterException(AdapterErrorKind.InvalidArgument,
                bbs.Count == 0 ? "no backbone is registered for adapters" : $"name the backbone: one of {string.Join(", ", bbs.Keys)}");
        }
        return bbs.TryGetValue(name, out var bb) ? bb
            : throw new AdapterException(AdapterErrorKind.NotFound, $"unknown backbone '{name}' (registered: {string.Join(", ", bbs.Keys)})");
    }

    public static void ValidateName(string name)
    {
        if (string.IsNullOrEmpty(name) || !NamePattern.IsMatch(name))
            throw new AdapterException(AdapterErrorKind.InvalidArgument,
                $"adapter name '{name}' is invalid: use 1-128 characters from A-Z a-z 0-9 . _ - starting with a letter or digit");
    }

    /// <summary>
    /// Loads the adapter at <paramref name="path"/> (file or folder, format detected; relative to
    /// and confined to <see cref="AdapterRegistryOptions.AdaptersRoot"/> when one is set) under
    /// <paramref name="name"/>, replacing any version already there.
    /// </summary>
    public AdapterVersion Load(string name, string? backbone, string path, string? format = null)
    {
        ValidateName(name);
        var bb = GetBackbone(backbone);
        string resolved = Options.AdaptersRoot is { } root
            ? AdapterPaths.ResolveUnderRoot(root, path)
            : Path.GetFullPath(path);
        var weights = LoraFormats.Load(resolved, bb.Targets, new LoraLoadOptions { MaxRank = Options.MaxRank, Format = format });
        return Install(name, bb, weights, path);
    }

    /// <summary>
    /// Like <see cref="Load"/> for a path the server itself chose (an upload's staging folder), so
    /// it is not confined to the adapters root. Never pass a client-supplied path here.
    /// </summary>
    public AdapterVersion LoadTrusted(string name, string? backbone, string path, string? format, string source)
    {
        ValidateName(name);
        var bb = GetBackbone(backbone);
        var weights = LoraFormats.Load(path, bb.Targets, new LoraLoadOptions { MaxRank = Options.MaxRank, Format = format });
        return Install(name, bb, weights, source);
    }

    /// <summary>Installs weights made elsewhere (an upload, a trainer); the registry takes ownership.</summary>
    public AdapterVersion Add(string name, string? backbone, LoraWeights weights, string source)
    {
        AdapterBackbone bb;
        try
        {
            ValidateName(name);
            bb = GetBackbone(backbone);
            var problems = new List<string>();
            foreach (var m in weights.Modules.Values)
            {
                if (!bb.Targets.Linears.TryGetValue(m.Path, out var shape)) problems.Add($"'{m.Path}': not a linear layer of {bb.Name}");
                else if (shape.In != m.InFeatures || shape.Out != m.OutFeatures)
                    problems.Add($"'{m.Path}': adapter is [{m.OutFeatures}x{m.InFeatures}], layer is [{shape.Out}x{shape.In}]");
                if (m.Rank > Options.MaxRank) problems.Add($"'{m.Path}': rank {m.Rank} exceeds the configured maximum {Options.MaxRank}");
            }
            if (weights.Modules.Count == 0) problems.Add("adapter has no modules");
            if (problems.Count > 0) throw new LoraFormatException(source, problems);
        }
        catch { weights.Dispose(); throw; }
        return Install(name, bb, weights, source);
    }

    private AdapterVersion Install(string name, AdapterBackbone bb, LoraWeights weights, string source)
    {
        AdapterVersion? old;
        AdapterVersion version;
        try
        {
            // Device copies are made before the swap, so the first request on the new version does not pay for the upload.
            if (bb.Device is not null || bb.DType is not null)
                weights.Prepare(bb.Device ?? CPU, bb.DType ?? weights.Modules.Values.First().A.dtype);
            lock (_gate)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                if (!_current.ContainsKey(name) && _current.Count >= Options.MaxAdapters)
                    throw new AdapterException(AdapterErrorKind.ResourceExhausted,
                        $"{_current.Count} adapters are resident, the configured maximum; unload one first");
                long v = _lastVersion.GetValueOrDefault(name) + 1;
                _lastVersion[name] = v;
                version = new AdapterVersion(name, v, bb.Name, source, weights);
                _current.TryGetValue(name, out old);
                _current = _current.SetItem(name, version);
            }
        }
        catch { weights.Dispose(); throw; }
        old?.Release();
        return version;
    }

    /// <summary>Removes the adapter; its memory is freed once no running request holds it.</summary>
    public AdapterVersion Unload(string name)
    {
        AdapterVersion? old;
        lock (_gate)
        {
            if (!_current.TryGetValue(name, out old))
                throw new AdapterException(AdapterErrorKind.NotFound, $"no adapter named '{name}' is loaded");
            _current = _current.Remove(name);
        }
        old.Release();
        return old;
    }

    public IReadOnlyList<AdapterVersion> List() => _current.Values.OrderBy(v => v.Name, StringComparer.Ordinal).ToList();

    public AdapterVersion? Get(string name) => _current.TryGetValue(name, out var v) ? v : null;

    public int Count => _current.Count;

    /// <summary>
    /// Captures the current version of each named adapter for one request (NotFound names every
    /// unknown one). Dispose the lease when the request ends.
    /// </summary>
    public AdapterLease Acquire(IEnumerable<string> names)
    {
        var wanted = names.Distinct(StringComparer.Ordinal).ToArray();
        while (true)
        {
            var snap = _current;
            var missing = wanted.Where(n => !snap.ContainsKey(n)).ToList();
            if (missing.Count > 0)
                throw new AdapterException(AdapterErrorKind.NotFound, $"no adapter named {string.Join(", ", missing.Select(n => $"'{n}'"))} is loaded");
            var got = new List<AdapterVersion>();
            bool raced = false;
            foreach (var n in wanted)
            {
                // Fails only if the version was replaced/unloaded and freed since the snapshot: retry on a fresh one.
                if (snap[n].TryAddRef()) got.Add(snap[n]);
                else { raced = true; break; }
            }
            if (!raced) return new AdapterLease(got.ToArray());
            foreach (var v in got) v.Release();
        }
    }

    public void Dispose()
    {
        ImmutableDictionary<string, AdapterVersion> all;
        lock (_gate)
        {
            if (_disposed) return;
            _disposed = true;
            all = _current;
            _current = _current.Clear();
        }
        foreach (var v in all.Values) v.Release();
    }
}

/// <summary>Confines client-supplied paths to a root folder.</summary>
public static class AdapterPaths
{
    /// <summary>
    /// Resolves <paramref name="requested"/> (relative to <paramref name="root"/>, or absolute) the way
    /// the kernel would, following every symlink and '..' physically, and refuses the result unless it
    /// is the root or inside it. Returns the resolved path, which is what must be opened (re-resolving
    /// the original string could follow a link swapped in meanwhile).
    /// </summary>
    public static string ResolveUnderRoot(string root, string requested)
    {
        if (string.IsNullOrWhiteSpace(requested))
            throw new AdapterException(AdapterErrorKind.InvalidArgument, "empty adapter path");
        if (requested.Contains('\0'))
            throw new AdapterException(AdapterErrorKind.InvalidArgument, "adapter path contains a NUL character");
        if (!Directory.Exists(root))
            throw new AdapterException(AdapterErrorKind.NotFound, $"adapters root '{root}' does not exist");
        var rootReal = RealPath(Path.GetFullPath(root));
        var result = Path.IsPathRooted(requested) ? RealPath(requested) : Walk(rootReal, requested);
        var sep = Path.DirectorySeparatorChar;
        if (result != rootReal && !result.StartsWith(rootReal.TrimEnd(sep) + sep, StringComparison.Ordinal))
            throw new AdapterException(AdapterErrorKind.PermissionDenied,
                $"adapter path '{requested}' resolves outside the adapters root");
        return result;
    }

    /// <summary>realpath(3) without requiring the final components to exist.</summary>
    public static string RealPath(string absolute)
    {
        var root = Path.GetPathRoot(absolute) ?? "/";
        return Walk(root, absolute[root.Length..]);
    }

    private static string Walk(string start, string relative)
    {
        var sep = Path.DirectorySeparatorChar;
        var pending = new LinkedList<string>(Split(relative));
        string cur = start;
        int hops = 0;
        while (pending.Count > 0)
        {
            var part = pending.First!.Value;
            pending.RemoveFirst();
            if (part == ".") continue;
            if (part == "..")
            {
                cur = Path.GetDirectoryName(cur) ?? cur; // parent of the root is the root
                continue;
            }
            var next = Path.Join(cur, part);
            string? target = new FileInfo(next).LinkTarget; // null unless `next` is a symlink (lstat)
            if (target is null) { cur = next; continue; }
            if (++hops > 40) throw new AdapterException(AdapterErrorKind.InvalidArgument, $"too many symbolic links in '{relative}'");
            var parts = Split(target).ToList();
            for (int i = parts.Count - 1; i >= 0; i--) pending.AddFirst(parts[i]);
            if (Path.IsPathRooted(target)) cur = Path.GetPathRoot(target) ?? sep.ToString();
        }
        return cur;
    }

    private static IEnumerable<string> Split(string p) =>
        p.Split([Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar], StringSplitOptions.RemoveEmptyEntries);
}
