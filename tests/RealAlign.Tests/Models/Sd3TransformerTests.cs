using System.Text.RegularExpressions;
using RealAlign.Core.IO;
using RealAlign.Core.Models;
using RealAlign.Core.Models.Transformers;
using RealAlign.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Tests.Models;

/// <summary>Golden tests for SD3Transformer2DModel against diffusers 0.32.2 (cases sd3_transformer, sd3_transformer_basic).</summary>
public class Sd3TransformerTests
{
    public static TheoryData<string> Cases => new() { "sd3_transformer", "sd3_transformer_basic" };

    /// <summary>
    /// The case's call, e.g. <c>model(hidden_states=in.hidden_states, ...)[0] -> out.sample</c>:
    /// keyword argument -> stored input, and the output name.
    /// </summary>
    private static (Dictionary<string, string> Args, string Output) ParseCall(GoldenCase c)
    {
        var call = c.Json["call"]!.GetValue<string>();
        var args = Regex.Matches(call, @"(\w+)=in\.([\w.]+)").ToDictionary(m => m.Groups[1].Value, m => m.Groups[2].Value);
        var output = Regex.Match(call, @"->\s*out\.([\w.]+)").Groups[1].Value;
        Assert.False(string.IsNullOrEmpty(output), $"cannot find the output in call '{call}'");
        return (args, output);
    }

    private static string ModelDir(GoldenCase c) => c.PathOf(c.Json["model_dir"]!.GetValue<string>());

    private static Tensor[] ForwardInputs(GoldenCase c, Dictionary<string, string> args)
    {
        string[] order = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"];
        foreach (var k in args.Keys) Assert.Contains(k, order);
        return order.Select(name => c.In(args[name])).ToArray();
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void ForwardMatchesDiffusers(string caseName)
    {
        using var c = Fixtures.Case(caseName);
        var (args, output) = ParseCall(c);
        using var model = SD3Transformer2DModel.FromPretrained(ModelDir(c));
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var x = ForwardInputs(c, args);
        var sample = model.forward(x[0], x[1], x[2], x[3]);
        c.AssertClose(output, sample);
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void StateDictKeysEqualCheckpointKeys(string caseName)
    {
        using var c = Fixtures.Case(caseName);
        var config = SD3Transformer2DModelConfig.Load(Path.Combine(ModelDir(c), "config.json"));
        using var model = new SD3Transformer2DModel(config);
        using var ck = SafeTensorsCheckpoint.OpenFolder(ModelDir(c), "diffusion_pytorch_model");
        var sd = model.state_dict();
        var modelKeys = sd.Keys.ToHashSet();
        var ckKeys = ck.Keys.ToHashSet();
        var missing = ckKeys.Except(modelKeys).Order().ToList();
        var extra = modelKeys.Except(ckKeys).Order().ToList();
        Assert.True(missing.Count == 0 && extra.Count == 0,
            $"checkpoint keys the model lacks: [{string.Join(", ", missing)}]; model keys the checkpoint lacks: [{string.Join(", ", extra)}]");
        foreach (var k in ckKeys)
            Assert.True(ck.Info(k).Shape.SequenceEqual(sd[k].shape), $"{k}: checkpoint [{string.Join(",", ck.Info(k).Shape)}] vs model [{string.Join(",", sd[k].shape)}]");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void ConstructedPositionTableEqualsStoredBuffer(string caseName)
    {
        // The sin-cos table is computed at construction exactly as upstream; the checkpoint stores upstream's values.
        using var c = Fixtures.Case(caseName);
        var config = SD3Transformer2DModelConfig.Load(Path.Combine(ModelDir(c), "config.json"));
        using var model = new SD3Transformer2DModel(config);
        using var ck = SafeTensorsCheckpoint.OpenFolder(ModelDir(c), "diffusion_pytorch_model");
        using var stored = ck.Load("pos_embed.pos_embed");
        using var diff = (model.pos_embed.pos_embed! - stored).abs().max();
        Assert.True(diff.item<float>() <= 1e-6f, $"pos_embed differs by {diff.item<float>()}");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void ForwardLeavesOnlyItsOutputAlive(string caseName)
    {
        using var c = Fixtures.Case(caseName);
        var (args, _) = ParseCall(c);
        using var model = SD3Transformer2DModel.FromPretrained(ModelDir(c));
        var x = ForwardInputs(c, args);
        try
        {
            using var _ = no_grad();
            var stats = DisposeScopeManager.Statistics;
            long before = stats.ThreadTotalLiveCount;
            using (var outer = NewDisposeScope())
            {
                var sample = model.forward(x[0], x[1], x[2], x[3]);
                Assert.Equal(1, outer.DisposablesCount);
                Assert.True(outer.Contains(sample));
            }
            Assert.Equal(before, stats.ThreadTotalLiveCount);

            // And with no scope of the caller's: exactly one new live tensor, the output.
            var loose = model.forward(x[0], x[1], x[2], x[3]);
            Assert.Equal(before + 1, stats.ThreadTotalLiveCount);
            loose.Dispose();
            Assert.Equal(before, stats.ThreadTotalLiveCount);
        }
        finally
        {
            foreach (var t in x) t.Dispose();
        }
    }

    [Fact]
    public void BackwardWorksThroughTheScopedForward()
    {
        // Freeing each block's inputs inside forward must not cut the autograd graph (training uses it).
        using var c = Fixtures.Case("sd3_transformer");
        var (args, _) = ParseCall(c);
        using var model = SD3Transformer2DModel.FromPretrained(ModelDir(c));
        using var scope = NewDisposeScope();
        var x = ForwardInputs(c, args);
        var loss = model.forward(x[0], x[1], x[2], x[3]).square().mean();
        loss.backward();
        foreach (var (name, p) in model.named_parameters())
        {
            Assert.True(p.grad is not null, $"{name} has no gradient");
            Assert.True(p.grad!.isfinite().all().item<bool>(), $"{name} has a non-finite gradient");
        }
        Assert.True(model.transformer_blocks[0].attn.to_q.weight.grad!.abs().sum().item<float>() > 0);
    }

    [Fact]
    public void LoadsShardedCheckpoint()
    {
        // Re-save the case's weights the way diffusers shards them (index.json + -0000k-of-0000n files).
        using var c = Fixtures.Case("sd3_transformer");
        var (args, output) = ParseCall(c);
        var dir = Path.Combine(Path.GetTempPath(), $"sd3-sharded-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            File.Copy(Path.Combine(ModelDir(c), "config.json"), Path.Combine(dir, "config.json"));
            var weightMap = new System.Text.Json.Nodes.JsonObject();
            using (var ck = SafeTensorsCheckpoint.OpenFolder(ModelDir(c), "diffusion_pytorch_model"))
            {
                var keys = ck.Keys.Order(StringComparer.Ordinal).ToList();
                var shards = new[] { keys.Take(keys.Count / 2).ToList(), keys.Skip(keys.Count / 2).ToList() };
                for (int i = 0; i < shards.Length; i++)
                {
                    var file = $"diffusion_pytorch_model-{i + 1:D5}-of-{shards.Length:D5}.safetensors";
                    var tensors = shards[i].ToDictionary(k => k, k => ck.Load(k));
                    SafeTensorsFile.Save(Path.Combine(dir, file), tensors);
                    foreach (var t in tensors.Values) t.Dispose();
                    foreach (var k in shards[i]) weightMap[k] = file;
                }
            }
            var index = new System.Text.Json.Nodes.JsonObject { ["metadata"] = new System.Text.Json.Nodes.JsonObject(), ["weight_map"] = weightMap };
            File.WriteAllText(Path.Combine(dir, "diffusion_pytorch_model.safetensors.index.json"), index.ToJsonString());

            using var model = SD3Transformer2DModel.FromPretrained(dir);
            using var _ = no_grad();
            using var scope = NewDisposeScope();
            var x = ForwardInputs(c, args);
            c.AssertClose(output, model.forward(x[0], x[1], x[2], x[3]));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void LinearLayersKnowTheirCheckpointPaths()
    {
        using var c = Fixtures.Case("sd3_transformer");
        var config = SD3Transformer2DModelConfig.Load(Path.Combine(ModelDir(c), "config.json"));
        using var model = new SD3Transformer2DModel(config);
        Assert.Equal("transformer_blocks.0.attn.to_q", model.transformer_blocks[0].attn.to_q.Path);
        Assert.Equal("transformer_blocks.0.attn2.to_out.0", ((LoRACompatibleLinear)model.transformer_blocks[0].attn2!.to_out![0]).Path);
        foreach (var (name, m) in model.named_modules())
            if (m is LoRACompatibleLinear l) Assert.Equal(name, l.Path);
        Assert.DoesNotContain(model.named_modules(), m => m.module is TorchSharp.Modules.Linear);
    }

    [Fact]
    public void BuildsInTargetDtype()
    {
        using var c = Fixtures.Case("sd3_transformer_basic");
        var config = SD3Transformer2DModelConfig.Load(Path.Combine(ModelDir(c), "config.json"));
        using var model = new SD3Transformer2DModel(config, dtype: ScalarType.BFloat16);
        Assert.All(model.parameters(), p => Assert.Equal(ScalarType.BFloat16, p.dtype));
        Assert.Equal(ScalarType.BFloat16, model.pos_embed.pos_embed!.dtype);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var x = randn(1, 16, 8, 12, dtype: ScalarType.BFloat16);
        var ctx = randn(1, 5, config.JointAttentionDim, dtype: ScalarType.BFloat16);
        var pooled = randn(1, config.PooledProjectionDim, dtype: ScalarType.BFloat16);
        var t = tensor(new float[] { 500f });
        var y = model.forward(x, ctx, pooled, t);
        Assert.Equal(new long[] { 1, 16, 8, 12 }, y.shape);
        Assert.Equal(ScalarType.BFloat16, y.dtype);
    }
}
