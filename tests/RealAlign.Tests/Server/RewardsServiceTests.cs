using Google.Protobuf;
using Grpc.Core;
using RealAlign.Core.Imaging;
using RealAlign.Server.Options;
using RealAlign.Tests.Infrastructure;
using RealAlign.V1;
using V1 = RealAlign.V1;
using static TorchSharp.torch;
using WireTensor = RealAlign.V1.Tensor;

namespace RealAlign.Tests.Server;

public class RewardsServiceTests
{
    /// <summary>(case, reward KIND served from the case's reward/ folder, reward name requested, golden output).</summary>
    public static TheoryData<string, string, string, string> EndToEndCases => new()
    {
        { "pickscore_e2e", "pickscore", "pick", "pickscore" },
        { "pickscore_e2e", "pickscore", "sgp_pickscore", "sgp" },
        { "aesthetic_e2e", "aesthetic", "aes", "aesthetic_score" },
        { "hps_e2e", "hpsv2", "hps", "hps_score" },
    };

    [Theory]
    [MemberData(nameof(EndToEndCases))]
    public async Task ScoreMatchesUpstreamFromPngFiles(string caseName, string kind, string reward, string output)
    {
        using var c = Fixtures.Case(caseName);
        var name = kind == "pickscore" ? "pick" : reward;
        var options = TestServer.Options() with
        {
            Rewards = [new RewardSpec(name, kind, c.PathOf(c.Json["reward_dir"]!.GetValue<string>()))],
        };
        await using var server = await TestServer.StartAsync(new FakePipeline(), options);
        var client = new V1.Rewards.RewardsClient(server.Channel);

        var request = new ScoreRequest();
        request.Rewards.Add(reward);
        foreach (var image in c.Json["images"]!.AsArray())
            request.Images.Add(new Image { Encoded = ByteString.CopyFrom(File.ReadAllBytes(c.PathOf(image!["file"]!.GetValue<string>()))) });
        if (c.Json["prompts"] is { } prompts)
            request.Prompts.AddRange(prompts.AsArray().Select(p => p!.GetValue<string>()));

        var response = await client.ScoreAsync(request);
        var got = response.Results.OrderBy(r => r.Index).Select(r => (float)r.Scores[reward]).ToArray();
        c.AssertClose(output, tensor(got));
    }

    private static Image Png(int width, int height, int seed)
    {
        var rgb = new byte[width * height * 3];
        new Random(seed).NextBytes(rgb);
        return new Image { Encoded = ByteString.CopyFrom(ImageCodec.EncodeRgb(rgb, width, height, SkiaSharp.SKEncodedImageFormat.Png, 100)) };
    }

    private static Image TensorImage(long[] shape, Func<int, float> value, string dtype = "float32")
    {
        var count = (int)shape.Aggregate(1L, (a, b) => a * b);
        var values = Enumerable.Range(0, count).Select(value).ToArray();
        var wire = Wire.TensorWireFloats(values, shape);
        wire.Dtype = dtype;
        return new Image { Tensor = wire };
    }

    private static ScoreRequest Request(IEnumerable<Image> images, IEnumerable<string>? prompts, params string[] rewards)
    {
        var r = new ScoreRequest();
        r.Images.AddRange(images);
        if (prompts is not null) r.Prompts.AddRange(prompts);
        r.Rewards.AddRange(rewards);
        return r;
    }

    /// <summary>Each bad input with the status it must get and a fragment of its message.</summary>
    public static IEnumerable<(string What, ScoreRequest Request, StatusCode Code, string Names)> BadRequests()
    {
        var png = Png(20, 12, 1);
        var bytes = png.Encoded.ToByteArray();
        yield return ("undecodable", Request([png, new Image { Encoded = ByteString.CopyFromUtf8("not an image") }], ["a", "b"], "pickscore"), StatusCode.InvalidArgument, "images[1]");
        yield return ("truncated", Request([new Image { Encoded = ByteString.CopyFrom(bytes, 0, bytes.Length / 2) }], ["a"], "pickscore"), StatusCode.InvalidArgument, "images[0]");
        yield return ("empty bytes", Request([png, png, new Image { Encoded = ByteString.Empty }], ["a", "b", "c"], "pickscore"), StatusCode.InvalidArgument, "images[2]");
        yield return ("zero-size tensor", Request([TensorImage([3, 0, 4], _ => 0f)], ["a"], "pickscore"), StatusCode.InvalidArgument, "images[0]");
        yield return ("over pixel limit", Request([png, Png(300, 300, 2)], ["a", "b"], "colorfulness"), StatusCode.InvalidArgument, "images[1]");
        yield return ("tensor out of range", Request([TensorImage([3, 4, 4], i => i == 5 ? 1.5f : 0.5f)], ["a"], "pickscore"), StatusCode.InvalidArgument, "element 5");
        yield return ("tensor not finite", Request([TensorImage([3, 4, 4], i => i == 7 ? float.NaN : 0.5f)], ["a"], "pickscore"), StatusCode.InvalidArgument, "element 7");
        yield return ("tensor wrong shape", Request([TensorImage([4, 4, 3], _ => 0.5f)], ["a"], "pickscore"), StatusCode.InvalidArgument, "[3, H, W]");
        yield return ("tensor wrong dtype", Request([new Image { Tensor = new WireTensor { Dtype = "uint8", Shape = { 3, 2, 2 }, Data = ByteString.CopyFrom(new byte[12]) } }], ["a"], "pickscore"), StatusCode.InvalidArgument, "float32");
        yield return ("count mismatch", Request([png, png], ["a"], "pickscore"), StatusCode.InvalidArgument, "prompts");
        yield return ("unknown reward", Request([png], ["a"], "pickscore", "nope"), StatusCode.NotFound, "'nope'");
        yield return ("no images", Request([], [], "pickscore"), StatusCode.InvalidArgument, "images");
    }

    [Fact]
    public async Task ScoresPngAndTensorInputsAndRefusesBadOnesWithoutBreakingTheStream()
    {
        var options = TestServer.Options(); // MaxPixels 256², no --reward: the embedded tiny CLIP
        await using var server = await TestServer.StartAsync(new FakePipeline(), options);
        var client = new V1.Rewards.RewardsClient(server.Channel);

        var list = await client.ListRewardsAsync(new ListRewardsRequest());
        var names = list.Rewards.Select(r => r.Name).ToList();
        Assert.Equal(["clip_score", "colorfulness", "jpeg_size", "laplacian_variance", "pickscore", "sgp_pickscore"], names);
        Assert.Equal(["clip_score", "clip_cosine"], list.Rewards.Single(r => r.Name == "clip_score").ScoreNames);

        // A PNG and the same pixels as a float tensor score the same.
        var rgb = new byte[24 * 16 * 3];
        new Random(3).NextBytes(rgb);
        var png = new Image { Encoded = ByteString.CopyFrom(ImageCodec.EncodeRgb(rgb, 24, 16, SkiaSharp.SKEncodedImageFormat.Png, 100)) };
        var chw = new float[rgb.Length];
        for (var p = 0; p < 24 * 16; p++)
            for (var ch = 0; ch < 3; ch++) chw[ch * 24 * 16 + p] = rgb[p * 3 + ch] / 255f;
        var asTensor = new Image { Tensor = Wire.TensorWireFloats(chw, [3, 16, 24]) };
        var ok = Request([png, asTensor, png], ["a red house", "a red house", "a cat"]);
        var unary = await client.ScoreAsync(ok);
        Assert.Equal(3, unary.Results.Count);
        var r0 = unary.Results[0].Scores;
        var r1 = unary.Results[1].Scores;
        foreach (var key in new[] { "pickscore", "clip_score", "clip_cosine", "sgp_pickscore", "colorfulness", "laplacian_variance", "jpeg_size" })
        {
            Assert.True(r0.ContainsKey(key), key);
            Assert.Equal(r0[key], r1[key], 4);
        }
        Assert.Equal(Math.Max(100 * r0["clip_cosine"], 0), r0["clip_score"], 4);
        Assert.NotEqual(r0["pickscore"], unary.Results[2].Scores["pickscore"]);

        // Unary: every bad input gets its status; the server keeps answering.
        foreach (var (what, request, code, fragment) in BadRequests())
        {
            var e = await Assert.ThrowsAsync<RpcException>(() => client.ScoreAsync(request).ResponseAsync);
            Assert.True(code == e.StatusCode, $"{what}: {e.StatusCode} {e.Status.Detail}");
            Assert.Contains(fragment, e.Status.Detail);
        }

        // Stream: the same inputs fail their item (or their message), the stream goes on.
        using var call = client.ScoreStream();
        var bad = BadRequests().ToList();
        foreach (var (what, request, _, _) in bad)
        {
            request.RequestId = what;
            await call.RequestStream.WriteAsync(request);
        }
        ok.RequestId = "ok";
        await call.RequestStream.WriteAsync(ok);
        await call.RequestStream.CompleteAsync();
        var responses = new List<ScoreResponse>();
        while (await call.ResponseStream.MoveNext(CancellationToken.None)) responses.Add(call.ResponseStream.Current);
        Assert.Equal(bad.Count + 1, responses.Count);
        for (var i = 0; i < bad.Count; i++)
        {
            var (what, _, code, fragment) = bad[i];
            var r = responses[i];
            Assert.Equal(what, r.RequestId);
            var error = r.Error ?? r.Results.Select(x => x.Error).Single(x => x is not null);
            Assert.True((int)code == error.Code, $"{what}: {error.Code} {error.Message}");
            Assert.Contains(fragment, error.Message);
            // Images that were fine in a message with a bad one are still scored.
            foreach (var item in r.Results.Where(x => x.Error is null)) Assert.True(item.Scores.ContainsKey("pickscore") || item.Scores.ContainsKey("colorfulness"), what);
        }
        var last = responses[^1];
        Assert.Equal("ok", last.RequestId);
        Assert.Null(last.Error);
        for (var i = 0; i < 3; i++)
            Assert.Equal(unary.Results[i].Scores["pickscore"], last.Results[i].Scores["pickscore"], 5);

        // Prompt-free rewards need no prompts.
        var stats = await client.ScoreAsync(Request([png], null, "colorfulness", "jpeg_size"));
        Assert.Equal(r0["colorfulness"], stats.Results[0].Scores["colorfulness"], 6);
    }

    private static class Wire
    {
        public static WireTensor TensorWireFloats(float[] values, long[] shape) => RealAlign.Server.Wire.TensorWire.FromFloats(values, shape);
    }
}
