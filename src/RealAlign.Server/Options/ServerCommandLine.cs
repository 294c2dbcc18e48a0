using System.CommandLine;
using System.CommandLine.Parsing;
using System.Net;
using System.Text.RegularExpressions;

namespace RealAlign.Server.Options;

/// <summary>Maps the command line onto <see cref="ServerOptions"/> (System.CommandLine 2.0).</summary>
public static partial class ServerCommandLine
{
    public static readonly string[] DTypes = ["float32", "float16", "bfloat16"];

    [GeneratedRegex("^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    private static partial Regex NamePattern();

    [GeneratedRegex("^[a-z0-9][a-z0-9_-]*$")]
    private static partial Regex KindPattern();

    [GeneratedRegex("^(cpu|cuda(:[0-9]+)?)$")]
    private static partial Regex DevicePattern();

    private sealed class Symbols
    {
        public readonly Option<int> GrpcPort = Port("--grpc-port", ServerOptions.DefaultGrpcPort, "gRPC (HTTP/2 cleartext) port");
        public readonly Option<int> MetricsPort = Port("--metrics-port", ServerOptions.DefaultMetricsPort, "Prometheus /metrics (HTTP/1.1) port");
        public readonly Option<string> Bind = new("--bind")
        {
            Description = "Address to listen on (IP address, 'localhost', or '*' for all interfaces); default $REALALIGN_BIND, else 127.0.0.1",
            DefaultValueFactory = _ => Environment.GetEnvironmentVariable("REALALIGN_BIND") is { Length: > 0 } env ? env : "127.0.0.1",
        };
        public readonly Option<string[]> Backbone = new("--backbone")
        {
            Description = "NAME=DIR: serve the diffusers SD3 pipeline folder DIR as NAME (repeatable). Without any, the embedded default 'tiny-sd3' is served",
            Arity = ArgumentArity.ZeroOrMore,
            HelpName = "NAME=DIR",
        };
        public readonly Option<string[]> Reward = new("--reward")
        {
            Description = "NAME=KIND:DIR: load the reward model KIND (pickscore, hpsv2, aesthetic, ...) from DIR as NAME (repeatable)",
            Arity = ArgumentArity.ZeroOrMore,
            HelpName = "NAME=KIND:DIR",
        };
        public readonly Option<string?> AdaptersRoot = new("--adapters-root")
        {
            Description = "Folder of the LoRA adapter registry",
            HelpName = "DIR",
        };
        public readonly Option<string?> Device = new("--device")
        {
            Description = "cpu, cuda or cuda:N (default: cuda when available, else cpu)",
        };
        public readonly Option<string?> DType = new("--dtype")
        {
            Description = "Weights dtype: float32, float16 or bfloat16 (default: float32 on cpu, bfloat16 on cuda)",
        };
        public readonly Option<int> MaxQueue = Positive("--max-queue", ServerOptions.DefaultMaxQueue, "Requests allowed to wait for the device; more are refused with RESOURCE_EXHAUSTED");
        public readonly Option<int> MaxImages = Positive("--max-images-per-request", ServerOptions.DefaultMaxImagesPerRequest, "Largest num_images accepted");
        public readonly Option<int> MaxSteps = Positive("--max-steps", ServerOptions.DefaultMaxSteps, "Largest num_inference_steps accepted");
        public readonly Option<long> MaxPixels = new("--max-pixels")
        {
            Description = "Largest width*height accepted",
            DefaultValueFactory = _ => ServerOptions.DefaultMaxPixels,
        };
        public readonly Option<int?> Threads = new("--threads")
        {
            Description = "torch.set_num_threads for CPU kernels",
        };

        public Symbols()
        {
            Bind.Validators.Add(r => { if (!TryParseBind(r.GetValueOrDefault<string>(), out _)) r.AddError($"--bind: '{r.GetValueOrDefault<string>()}' is not an IP address, 'localhost' or '*'"); });
            Backbone.Validators.Add(r =>
            {
                var seen = new HashSet<string>();
                foreach (var v in r.GetValueOrDefault<string[]>() ?? [])
                {
                    if (!TryParseBackbone(v, out var spec, out var error)) r.AddError(error);
                    else if (!seen.Add(spec.Name)) r.AddError($"--backbone: name '{spec.Name}' is given twice");
                }
            });
            Reward.Validators.Add(r =>
            {
                var seen = new HashSet<string>();
                foreach (var v in r.GetValueOrDefault<string[]>() ?? [])
                {
                    if (!TryParseReward(v, out var spec, out var error)) r.AddError(error);
                    else if (!seen.Add(spec.Name)) r.AddError($"--reward: name '{spec.Name}' is given twice");
                }
            });
            AdaptersRoot.Validators.Add(r =>
            {
                var dir = r.GetValueOrDefault<string?>();
                if (string.IsNullOrWhiteSpace(dir)) r.AddError("--adapters-root: expected a folder");
            });
            Device.Validators.Add(r =>
            {
                var d = r.GetValueOrDefault<string?>();
                if (d is null || !DevicePattern().IsMatch(d)) r.AddError($"--device: '{d}' is not one of cpu, cuda, cuda:N");
            });
            DType.Validators.Add(r =>
            {
                var d = r.GetValueOrDefault<string?>();
                if (d is null || !DTypes.Contains(d)) r.AddError($"--dtype: '{d}' is not one of {string.Join(", ", DTypes)}");
            });
            MaxPixels.Validators.Add(r => { if (r.GetValueOrDefault<long>() <= 0) r.AddError("--max-pixels: must be positive"); });
            Threads.Validators.Add(r => { if (r.GetValueOrDefault<int?>() is not > 0) r.AddError("--threads: must be positive"); });
        }

        public IEnumerable<Option> All =>
            [GrpcPort, MetricsPort, Bind, Backbone, Reward, AdaptersRoot, Device, DType, MaxQueue, MaxImages, MaxSteps, MaxPixels, Threads];

        public ServerOptions ToOptions(ParseResult p)
        {
            TryParseBind(p.GetValue(Bind), out var bind);
            return new ServerOptions
            {
                GrpcPort = p.GetValue(GrpcPort),
                MetricsPort = p.GetValue(MetricsPort),
                BindAddress = bind!,
                Backbones = (p.GetValue(Backbone) ?? []).Select(v => { TryParseBackbone(v, out var s, out _); return s!; }).ToList(),
                Rewards = (p.GetValue(Reward) ?? []).Select(v => { TryParseReward(v, out var s, out _); return s!; }).ToList(),
                AdaptersRoot = p.GetValue(AdaptersRoot),
                Device = p.GetValue(Device),
                DType = p.GetValue(DType),
                MaxQueue = p.GetValue(MaxQueue),
                MaxImagesPerRequest = p.GetValue(MaxImages),
                MaxSteps = p.GetValue(MaxSteps),
                MaxPixels = p.GetValue(MaxPixels),
                Threads = p.GetValue(Threads),
            };
        }

        private static Option<int> Port(string name, int dflt, string description)
        {
            var o = new Option<int>(name) { Description = description, DefaultValueFactory = _ => dflt };
            o.Validators.Add(r => { var v = r.GetValueOrDefault<int>(); if (v is < 0 or > 65535) r.AddError($"{name}: {v} is not a TCP port (0-65535)"); });
            return o;
        }

        private static Option<int> Positive(string name, int dflt, string description)
        {
            var o = new Option<int>(name) { Description = description, DefaultValueFactory = _ => dflt };
            o.Validators.Add(r => { var v = r.GetValueOrDefault<int>(); if (v <= 0) r.AddError($"{name}: must be positive, got {v}"); });
            return o;
        }
    }

    /// <summary>The root command; <paramref name="run"/> gets the options once parsing succeeded.</summary>
    public static RootCommand Create(Func<ServerOptions, CancellationToken, Task<int>> run)
    {
        var s = new Symbols();
        var root = new RootCommand("RealAlign gRPC server: resident text-to-image backbones that record each sample's prior noise");
        foreach (var o in s.All) root.Options.Add(o);
        root.SetAction((p, ct) => run(s.ToOptions(p), ct));
        return root;
    }

    /// <summary>Parses without running anything: either options or the list of errors.</summary>
    public static (ServerOptions? Options, IReadOnlyList<string> Errors) Parse(params string[] args)
    {
        var s = new Symbols();
        var root = new RootCommand();
        foreach (var o in s.All) root.Options.Add(o);
        var p = root.Parse(args);
        if (p.Errors.Count > 0) return (null, p.Errors.Select(e => e.Message).ToList());
        return (s.ToOptions(p), []);
    }

    public static bool TryParseBackbone(string value, out BackboneSpec spec, out string error)
    {
        spec = null!;
        var eq = value.IndexOf('=');
        if (eq <= 0 || eq == value.Length - 1)
        {
            error = $"--backbone: '{value}' is not NAME=DIR (e.g. sd35m=/models/stable-diffusion-3.5-medium)";
            return false;
        }
        var name = value[..eq];
        var dir = value[(eq + 1)..];
        if (!NamePattern().IsMatch(name))
        {
            error = $"--backbone: name '{name}' may only contain letters, digits, '.', '_' and '-'";
            return false;
        }
        if (!Directory.Exists(dir))
        {
            error = $"--backbone {name}: folder '{dir}' does not exist";
            return false;
        }
        if (!File.Exists(Path.Combine(dir, "model_index.json")))
        {
            error = $"--backbone {name}: '{dir}' is not a diffusers pipeline folder (no model_index.json)";
            return false;
        }
        spec = new BackboneSpec(name, Path.GetFullPath(dir));
        error = "";
        return true;
    }

    public static bool TryParseReward(string value, out RewardSpec spec, out string error)
    {
        spec = null!;
        var eq = value.IndexOf('=');
        var colon = eq < 0 ? -1 : value.IndexOf(':', eq + 1);
        if (eq <= 0 || colon < 0 || colon == eq + 1 || colon == value.Length - 1)
        {
            error = $"--reward: '{value}' is not NAME=KIND:DIR (e.g. pick=pickscore:/models/PickScore_v1)";
            return false;
        }
        var name = value[..eq];
        var kind = value[(eq + 1)..colon];
        var dir = value[(colon + 1)..];
        if (!NamePattern().IsMatch(name))
        {
            error = $"--reward: name '{name}' may only contain letters, digits, '.', '_' and '-'";
            return false;
        }
        if (!KindPattern().IsMatch(kind))
        {
            error = $"--reward {name}: kind '{kind}' must be a lowercase identifier such as pickscore, hpsv2 or aesthetic";
            return false;
        }
        if (!Directory.Exists(dir))
        {
            error = $"--reward {name}: folder '{dir}' does not exist";
            return false;
        }
        spec = new RewardSpec(name, kind, Path.GetFullPath(dir));
        error = "";
        return true;
    }

    public static bool TryParseBind(string? value, out IPAddress? address)
    {
        address = value switch
        {
            null or "" => null,
            "localhost" => IPAddress.Loopback,
            "*" => IPAddress.Any,
            _ => IPAddress.TryParse(value, out var a) ? a : null,
        };
        return address is not null;
    }
}
