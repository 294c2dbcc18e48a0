using System.Diagnostics;
using RealAlign.Bench;

// Benchmarks print figures measured side by side in one run. Usage:
//   dotnet run -c Release --project bench/RealAlign.Bench -- [generation|rewards|lora|all] [--threads N] [--fixtures DIR]
var argsList = args.ToList();
string Opt(string name, string dflt) { int i = argsList.IndexOf(name); return i >= 0 && i + 1 < argsList.Count ? argsList[i + 1] : dflt; }
int threads = int.Parse(Opt("--threads", "2"));
string fixtures = Opt("--fixtures", Path.Combine(BenchPaths.RepoRoot(), "tests", "fixtures"));
string what = argsList.FirstOrDefault(a => !a.StartsWith("--") && !int.TryParse(a, out _) && !Directory.Exists(a)) ?? "all";
TorchSharp.torch.set_num_threads(threads);
Console.WriteLine($"# RealAlign.Grpc bench — {DateTime.UtcNow:u}, {Environment.ProcessorCount} cores visible, torch threads {threads}");
var sw = Stopwatch.StartNew();
if (what is "all" or "generation" or "grpc") await GrpcOverheadBench.RunAsync();
if (what is "all" or "generation") GenerationBench.Run(fixtures);
if (what is "all" or "rewards") RewardsBench.Run();
if (what is "all" or "lora") LoraBench.Run();
Console.WriteLine($"# done in {sw.Elapsed.TotalSeconds:F1} s");
