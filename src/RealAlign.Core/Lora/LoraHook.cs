using RealAlign.Core.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Lora;

/// <summary>
/// One adapter of a <see cref="LoraHook"/> and its scale per batch row (0 = the row does not use it).
/// A single entry applies to every row.
/// </summary>
public sealed record LoraHookAdapter(LoraWeights Weights, IReadOnlyList<double> RowScales)
{
    public static LoraHookAdapter AllRows(LoraWeights weights, double scale = 1.0) => new(weights, [scale]);
}

/// <summary>
/// Serves resident adapters without touching base weights: every adapted
/// <see cref="LoRACompatibleLinear"/> returns <c>y + Σ_adapters rowScale[b] · scaling · B(A x[b])</c>,
/// the forward of peft's lora.Linear (<c>result + lora_B(lora_A(x)) * scaling</c>, scaling =
/// alpha/r times the lora scale) restricted to the rows that use each adapter, so one batch can mix
/// adapters (LoRAX-style heterogeneous batching).
///
/// Rows are dim 0 of the layer input. When a pipeline doubles the batch for classifier-free
/// guidance (<c>cat([uncond, cond])</c>, as diffusers does), the layer sees k·N rows for N row
/// scales; row i then uses scale i mod N, which is what the request-level scale means for both halves.
///
/// Install it for one forward / pipeline call on the executor thread with
/// <c>using (LinearHooks.Use(hook)) { ... }</c>. Not thread-safe: one hook per running call.
/// </summary>
public sealed class LoraHook : ILinearHook, IDisposable
{
    private readonly Entry[] _entries;

    private sealed class Entry(LoraWeights weights, double[] rowScales)
    {
        public LoraWeights Weights { get; } = weights;
        public double[] RowScales { get; } = rowScales;
        /// <summary>Scale shared by every row, or null when rows differ.</summary>
        public double? Uniform { get; } = rowScales.Distinct().Count() == 1 ? rowScales[0] : null;
        public readonly Dictionary<(long Rows, DeviceType Dev, int Index, ScalarType Dtype), (Tensor Index, double[] Scales)> RowCache = new();
    }

    public IReadOnlyList<LoraWeights> Adapters => _entries.Select(e => e.Weights).ToList();

    private readonly IReadOnlySet<LoRACompatibleLinear>? _scope;

    /// <param name="scope">only these layers are adapted (e.g. the backbone transformer's, see
    /// <see cref="LoraTargetSet.Layers"/>); null adapts any layer whose path an adapter names.</param>
    public LoraHook(IEnumerable<LoraHookAdapter> adapters, LoraTargetSet? scope = null)
    {
        _scope = scope?.Layers;
        _entries = adapters.Select(a =>
        {
            if (a.RowScales.Count == 0) throw new ArgumentException("an adapter needs at least one row scale");
            if (a.RowScales.Any(s => !double.IsFinite(s))) throw new ArgumentException("LoRA scales must be finite");
            return new Entry(a.Weights, a.RowScales.ToArray());
        }).Where(e => e.RowScales.Any(s => s != 0)).ToArray();
    }

    public LoraHook(LoraWeights weights, double scale = 1.0, LoraTargetSet? scope = null) : this([LoraHookAdapter.AllRows(weights, scale)], scope) { }

    public Tensor Apply(LoRACompatibleLinear layer, Tensor x, Tensor y)
    {
        if (_scope is not null && !_scope.Contains(layer)) return y;
        Tensor? result = null;
        using var scope = NewDisposeScope();
        foreach (var e in _entries)
        {
            if (!e.Weights.Modules.TryGetValue(layer.Path, out var module)) continue;
            var (a, b) = e.Weights.DeviceCopy(layer.Path, y.device, y.dtype);
            double scaling = module.Scaling(e.Weights.UseRsLora);
            var acc = result ?? y;
            if (e.Uniform is { } s)
            {
                // Same op order as peft: B(A x) * (alpha/r * scale), the scalar rounded to the tensor dtype once.
                var delta = nn.functional.linear(nn.functional.linear(x, a), b).mul(scaling * s);
                result = acc.add(delta);
                continue;
            }
            long rows = x.shape[0];
            var (index, scales) = RowsOf(e, rows, y.device, y.dtype);
            var xs = x.index_select(0, index);
            var d = nn.functional.linear(nn.functional.linear(xs, a), b);
            var shape = new long[d.dim()];
            Array.Fill(shape, 1L);
            shape[0] = scales.Length;
            var scaleTensor = tensor(scales.Select(v => v * scaling).ToArray(), dtype: ScalarType.Float64).to(y.device).to_type(y.dtype).reshape(shape);
            result = acc.index_add(0, index, d.mul(scaleTensor), 1);
        }
        return result is null ? y : result.MoveToOuterDisposeScope();
    }

    public void Dispose()
    {
        foreach (var e in _entries)
        {
            foreach (var (t, _) in e.RowCache.Values) t.Dispose();
            e.RowCache.Clear();
        }
    }

    /// <summary>Rows (of the layer's batch) that use the adapter and their scales; cached per batch size and device.</summary>
    private static (Tensor Index, double[] Scales) RowsOf(Entry e, long rows, Device device, ScalarType dtype)
    {
        var key = (rows, device.type, device.index, dtype);
        if (e.RowCache.TryGetValue(key, out var hit)) return hit;
        int n = e.RowScales.Length;
        if (rows % n != 0)
            throw new InvalidOperationException($"LoRA hook has {n} row scale(s) but the layer input has {rows} rows (not a multiple)");
        var idx = new List<long>();
        var sc = new List<double>();
        for (long i = 0; i < rows; i++)
        {
            double s = e.RowScales[i % n];
            if (s != 0) { idx.Add(i); sc.Add(s); }
        }
        var t = tensor(idx.ToArray(), dtype: ScalarType.Int64).to(device).DetachFromDisposeScope();
        var entry = (t, sc.ToArray());
        e.RowCache[key] = entry;
        return entry;
    }
}
