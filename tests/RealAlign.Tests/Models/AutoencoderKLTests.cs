using System.Text.RegularExpressions;
using RealAlign.Core.Models.Autoencoders;
using RealAlign.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Tests.Models;

/// <summary>Golden cases vae_sd3 and vae_sd15 (diffusers 0.32.2 AutoencoderKL, float32 CPU).</summary>
public class AutoencoderKLTests
{
    public static TheoryData<string> Cases => new() { "vae_sd3", "vae_sd15" };

    private static AutoencoderKL Load(GoldenCase c) =>
        AutoencoderKL.FromPretrained(c.PathOf(c.Json["model_dir"]!.GetValue<string>()));

    /// <summary>The input a case.json "call" line feeds (e.g. "model.decode(in.latent)" → "latent").</summary>
    private static string CallInput(GoldenCase c, string method)
    {
        var line = c.Json["call"]!.AsArray().Select(n => n!.GetValue<string>()).Single(l => l.Contains($".{method}("));
        return Regex.Match(line, $@"\.{method}\(in\.(\w+)\)").Groups[1].Value is { Length: > 0 } name
            ? name : throw new InvalidDataException($"{c.Dir}: cannot find the {method} input in '{line}'");
    }

    [Theory, MemberData(nameof(Cases))]
    public void ConfigAndPropertiesFollowTheCase(string caseName)
    {
        using var c = Fixtures.Case(caseName);
        using var vae = Load(c);
        var expected = c.Json["config"]!.AsObject();
        Assert.Equal(expected["latent_channels"]!.GetValue<int>(), vae.LatentChannels);
        Assert.Equal(expected["scaling_factor"]!.GetValue<double>(), vae.ScalingFactor);
        Assert.Equal(expected["shift_factor"]?.GetValue<double>() ?? 0.0, vae.ShiftFactor);
        Assert.Equal(expected["use_quant_conv"]!.GetValue<bool>(), vae.Config.UseQuantConv);
        Assert.Equal(expected["use_post_quant_conv"]!.GetValue<bool>(), vae.Config.UsePostQuantConv);
        Assert.Equal(expected["block_out_channels"]!.AsArray().Select(n => n!.GetValue<int>()), vae.Config.BlockOutChannels);
        Assert.Equal(c.Json["downsample_factor"]!.GetValue<int>(), vae.ScaleFactor);
    }

    [Theory, MemberData(nameof(Cases))]
    public void EncodeGivesPosteriorMeanLogvarStd(string caseName)
    {
        using var c = Fixtures.Case(caseName);
        using var vae = Load(c);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var image = c.In(CallInput(c, "encode"));

        var (mean, logvar) = vae.EncodeMoments(image);
        c.AssertClose("latent_mean", mean);
        c.AssertClose("latent_logvar", logvar);
        c.AssertClose("latent_std", (0.5 * logvar).exp());

        using var posterior = vae.Encode(image);
        Assert.True(posterior.Mean.allclose(mean, 0, 0));
        c.AssertClose("latent_std", posterior.Std);
    }

    [Theory, MemberData(nameof(Cases))]
    public void DecodeIsRawDecoderOutput(string caseName)
    {
        using var c = Fixtures.Case(caseName);
        using var vae = Load(c);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var decoded = vae.Decode(c.In(CallInput(c, "decode")));
        c.AssertClose("decoded", decoded);
    }

    [Theory, MemberData(nameof(Cases))]
    public void LatentScalingRoundTrips(string caseName)
    {
        using var c = Fixtures.Case(caseName);
        using var vae = Load(c);
        using var scope = NewDisposeScope();
        var z = c.In(CallInput(c, "decode"));
        var back = vae.FromModelLatents(vae.ToModelLatents(z));
        Assert.True(back.allclose(z, 1e-5, 1e-6));
    }
}
