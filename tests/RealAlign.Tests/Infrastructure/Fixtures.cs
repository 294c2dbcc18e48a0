using System.Text.Json.Nodes;
using RealAlign.Core.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Tests.Infrastructure;

/// <summary>
/// Golden cases produced by diffusers/transformers (tests/fixtures, copied byte-identical from the
/// shared fixture set). <c>REALALIGN_FIXTURES</c> moves the root to another folder of the same layout.
/// </summary>
public static class Fixtures
{
    public static string Root { get; } = FindRoot();

    private static string FindRoot()
    {
        var env = Environment.GetEnvironmentVariable("REALALIGN_FIXTURES");
        if (!string.IsNullOrEmpty(env)) return Path.GetFullPath(env);
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null)
        {
            var candidate = Path.Combine(dir.FullName, "tests", "fixtures");
            if (Directory.Exists(candidate)) return candidate;
            dir = dir.Parent;
        }
        throw new DirectoryNotFoundException("tests/fixtures not found above " + AppContext.BaseDirectory);
    }

    public static GoldenCase Case(string name) => new(Path.Combine(Root, name));
}

/// <summary>One case folder: case.json + io.safetensors (+ model folders).</summary>
public sealed class GoldenCase : IDisposable
{
    public string Dir { get; }
    public JsonObject Json { get; }
    public SafeTensorsFile IO { get; }

    public GoldenCase(string dir)
    {
        Dir = dir;
        Json = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "case.json")))!.AsObject();
        IO = SafeTensorsFile.Open(Path.Combine(dir, "io.safetensors"));
    }

    public string PathOf(params string[] parts) => Path.Combine([Dir, .. parts]);
    public Tensor In(string name) => IO.Load("in." + name);
    public Tensor Out(string name) => IO.Load("out." + name);
    public bool HasOut(string name) => IO.Contains("out." + name);
    public IEnumerable<string> OutNames => IO.Tensors.Keys.Where(k => k.StartsWith("out.")).Select(k => k[4..]);

    /// <summary>Tolerances of an output from case.json (<c>tolerance.&lt;name&gt;</c> with max_abs and rel_l2).</summary>
    public (double MaxAbs, double RelL2) Tolerance(string output)
    {
        var tol = Json["tolerance"]?.AsObject() ?? throw new InvalidDataException($"{Dir}: case.json has no tolerance");
        var t = tol[output] ?? throw new KeyNotFoundException($"{Dir}: case.json gives no tolerance for '{output}'");
        return (t["max_abs"]?.GetValue<double>() ?? 0, t["rel_l2"]?.GetValue<double>() ?? 0);
    }

    /// <summary>Asserts got ≈ expected under the case's tolerance for that output (exact for integer outputs).</summary>
    public void AssertClose(string output, Tensor got, Tensor? expected = null)
    {
        using var scope = NewDisposeScope();
        var exp = expected ?? Out(output);
        Assert.True(exp.shape.SequenceEqual(got.shape),
            $"{output}: shape [{string.Join(",", got.shape)}] != expected [{string.Join(",", exp.shape)}]");
        if (!exp.is_floating_point())
        {
            var eq = exp.to(ScalarType.Int64).eq(got.to(ScalarType.Int64).cpu());
            long bad = (~eq).sum().item<long>();
            Assert.True(bad == 0, $"{output}: {bad} integer element(s) differ");
            return;
        }
        var (maxAbs, relL2) = Tolerance(output);
        var g = got.detach().cpu().to(ScalarType.Float64);
        var e = exp.to(ScalarType.Float64);
        double worst = (g - e).abs().max().item<double>();
        double rel = (g - e).norm().item<double>() / Math.Max(e.norm().item<double>(), 1e-30);
        Assert.True(worst <= maxAbs && rel <= relL2,
            $"{output}: max_abs {worst:E3} (tol {maxAbs:E1}), rel_l2 {rel:E3} (tol {relL2:E1})");
    }

    public void Dispose() => IO.Dispose();
}
