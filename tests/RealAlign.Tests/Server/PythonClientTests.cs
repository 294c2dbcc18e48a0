using System.Diagnostics;
using System.Text.Json.Nodes;

namespace RealAlign.Tests.Server;

/// <summary>
/// clients/python against the real server. Runs only where /usr/bin/python3 has grpc and numpy and the
/// stubs can be generated (.ci/run installs python3-grpcio python3-numpy protobuf-compiler
/// protobuf-compiler-grpc); elsewhere it returns without asserting.
/// </summary>
public sealed class PythonClientTests
{
    private const string Python = "/usr/bin/python3";

    private static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "RealAlign.Grpc.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new DirectoryNotFoundException("RealAlign.Grpc.sln not found above " + AppContext.BaseDirectory);
    }

    private static (int Code, string Output) Run(string file, string args, IDictionary<string, string>? env = null)
    {
        var psi = new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var (k, v) in env ?? new Dictionary<string, string>()) psi.Environment[k] = v;
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(120))) { p.Kill(entireProcessTree: true); return (-1, "timed out"); }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }

    [Fact]
    public async Task The_python_client_generates_and_decodes_prior_noise()
    {
        if (!File.Exists(Python) || Run(Python, "-c \"import grpc, numpy\"").Code != 0) return;
        var root = RepoRoot();
        var work = Directory.CreateTempSubdirectory("realalign-py-").FullName;
        try
        {
            CopyDirectory(Path.Combine(root, "clients", "python", "realalign"), Path.Combine(work, "realalign"));
            var (genCode, genOut) = Run("bash", $"\"{Path.Combine(root, "clients", "python", "generate_stubs.sh")}\" \"{work}\"",
                new Dictionary<string, string> { ["PYTHON"] = Python });
            if (genCode != 0 && genOut.Contains("need grpcio-tools")) return; // no stub generator on this machine
            Assert.True(genCode == 0, genOut);

            await using var server = await TestServer.StartAsync(new FakePipeline());
            var script = Path.Combine(work, "check.py");
            File.WriteAllText(script, """
                import json, sys
                import numpy as np
                from realalign import RealAlignClient, generate, numpy_to_tensor, tensor_to_numpy
                target = sys.argv[1]
                out = generate(target, "a cat", backbone="fake", width=16, height=16, steps=2, num_images=2, seeds=[11, 12])
                with RealAlignClient(target) as c:
                    names = [b.name for b in c.list_backbones()]
                    noise = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8) / 100
                    again = c.generate("a cat", backbone="fake", width=16, height=16, steps=1, prior_noise=[noise], return_image_tensor=True)
                    try:
                        c.generate("a cat", backbone="nope")
                        code = "OK"
                    except Exception as e:
                        code = e.code().name
                bf = tensor_to_numpy(numpy_to_tensor(np.array([1.0, -2.5, 3.0], dtype=np.float32), "bfloat16"))
                print(json.dumps({
                    "names": names,
                    "pngs": [p[:8].hex() for p, _, _ in out],
                    "shapes": [list(n.shape) for _, n, _ in out],
                    "dtypes": [str(n.dtype) for _, n, _ in out],
                    "seeds": [s for _, _, s in out],
                    "sums": [float(n.astype(np.float64).sum()) for _, n, _ in out],
                    "echo": bool(np.array_equal(again[0].prior_noise, noise)),
                    "image_shape": list(again[0].image.shape),
                    "not_found": code,
                    "bf16": bf.tolist(),
                }))
                """);
            var (code, output) = Run(Python, $"\"{script}\" {server.Host.GrpcAddress.Authority}",
                new Dictionary<string, string> { ["PYTHONPATH"] = work });
            Assert.True(code == 0, output);

            var result = JsonNode.Parse(output.Trim().Split('\n')[^1])!;
            Assert.Equal("fake", result["names"]![0]!.GetValue<string>());
            Assert.All(result["pngs"]!.AsArray(), p => Assert.Equal("89504e470d0a1a0a", p!.GetValue<string>()));
            Assert.All(result["shapes"]!.AsArray(), s => Assert.Equal("[4,8,8]", s!.ToJsonString()));
            Assert.All(result["dtypes"]!.AsArray(), d => Assert.Equal("float32", d!.GetValue<string>()));
            Assert.Equal("[11,12]", result["seeds"]!.ToJsonString());
            for (var i = 0; i < 2; i++)
            {
                using var expected = FakePipeline.Noise(11 + i, 16, 16);
                Assert.Equal(expected.data<float>().ToArray().Sum(v => (double)v), result["sums"]![i]!.GetValue<double>(), 4);
            }
            Assert.True(result["echo"]!.GetValue<bool>());
            Assert.Equal("[3,16,16]", result["image_shape"]!.ToJsonString());
            Assert.Equal("NOT_FOUND", result["not_found"]!.GetValue<string>());
            Assert.Equal("[1.0,-2.5,3.0]", result["bf16"]!.ToJsonString());
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
    }

    private static void CopyDirectory(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(from).Where(f => !f.EndsWith(".pyc"))) File.Copy(f, Path.Combine(to, Path.GetFileName(f)));
        foreach (var d in Directory.GetDirectories(from).Where(d => Path.GetFileName(d) != "__pycache__"))
            CopyDirectory(d, Path.Combine(to, Path.GetFileName(d)));
    }
}
