using System.Globalization;
using Grpc.Core;
using RealAlign.Core.Imaging;
using RealAlign.Core.Rewards;
using RealAlign.Server.Execution;
using RealAlign.Server.Interceptors;
using RealAlign.Server.Observability;
using RealAlign.Server.Options;
using RealAlign.Server.Wire;
using RealAlign.V1;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Server.Services;

/// <summary>
/// realalign.v1.Rewards: validates and decodes images at the edge (thread pool), then scores the
/// batch on the device thread, one call per requested reward. Errors are domain exceptions that
/// ExceptionInterceptor maps; ScoreStream turns them into per-item / per-message errors instead.
/// </summary>
public sealed class RewardsService(RewardRegistry registry, DeviceExecutor executor, ServerOptions options) : V1.Rewards.RewardsBase
{
    /// <summary>Images one ScoreRequest may carry.</summary>
    public const int MaxImagesPerScore = 256;

    /// <summary>An image ready for the device thread (interleaved RGB bytes) or why it was refused.</summary>
    private sealed record DecodedImage(byte[]? Rgb, int Width, int Height, Exception? Error);

    private sealed record Plan(IReadOnlyList<IRewardScorer> Scorers, IReadOnlyList<string> Prompts, int Count);

    /// <summary>Maps <c>--reward</c> specs onto the registry (the embedded tiny CLIP when there are none).</summary>
    public static RewardRegistry LoadRegistry(ServerOptions options, Device device) =>
        RewardRegistry.Load(options.Rewards.Select(r => new RewardDefinition(r.Name, r.Kind, r.Directory)).ToList(), device);

    public override async Task<ScoreResponse> Score(ScoreRequest request, ServerCallContext context)
    {
        RequestLog.Of(context).Images = request.Images.Count;
        var plan = MakePlan(request);
        var images = await DecodeAllAsync(request, context.CancellationToken);
        if (images.FirstOrDefault(i => i.Error is not null) is { Error: { } first }) throw first;
        return await ScoreAsync(request, plan, images, context.CancellationToken);
    }

    public override async Task ScoreStream(IAsyncStreamReader<ScoreRequest> requestStream, IServerStreamWriter<ScoreResponse> responseStream, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        var count = 0;
        await foreach (var request in requestStream.ReadAllAsync(ct))
        {
            count += request.Images.Count;
            RequestLog.Of(context).Images = count;
            ScoreResponse response;
            try
            {
                var plan = MakePlan(request);
                var images = await DecodeAllAsync(request, ct);
                response = await ScoreAsync(request, plan, images, ct);
            }
            catch (Exception e) when (e is not OperationCanceledException || !ct.IsCancellationRequested)
            {
                response = new ScoreResponse { RequestId = request.RequestId, Error = ToItemError(e, context) };
            }
            await responseStream.WriteAsync(response, ct);
        }
    }

    public override Task<ListRewardsResponse> ListRewards(ListRewardsRequest request, ServerCallContext context)
    {
        var response = new ListRewardsResponse();
        foreach (var s in registry.Scorers.OrderBy(s => s.Name, StringComparer.Ordinal))
        {
            var info = new RewardInfo { Name = s.Name, Kind = s.Kind, NeedsPrompt = s.NeedsPrompt };
            info.ScoreNames.AddRange(s.ScoreNames);
            response.Rewards.Add(info);
        }
        return Task.FromResult(response);
    }

    private static ItemError ToItemError(Exception e, ServerCallContext context)
    {
        var status = ExceptionInterceptor.Map(e, context);
        return new ItemError { Code = (int)status.StatusCode, Message = status.Detail };
    }

    /// <summary>Message-level checks: image count, reward names, prompt count.</summary>
    private Plan MakePlan(ScoreRequest request)
    {
        var n = request.Images.Count;
        if (n == 0) throw new InvalidRequestException("images: at least one image is required");
        if (n > MaxImagesPerScore) throw new InvalidRequestException($"images: {n} images, more than the limit of {MaxImagesPerScore} per request; split the request");
        var names = request.Rewards.Count == 0 ? registry.Scorers.Select(s => s.Name).ToList() : request.Rewards.Distinct(StringComparer.Ordinal).ToList();
        var scorers = new List<IRewardScorer>();
        for (var i = 0; i < names.Count; i++)
        {
            if (string.IsNullOrEmpty(names[i])) throw new InvalidRequestException($"rewards[{i}]: empty reward name");
            scorers.Add(registry.Get(names[i]));
        }
        var needsPrompt = scorers.Where(s => s.NeedsPrompt).Select(s => s.Name).ToList();
        IReadOnlyList<string> prompts = request.Prompts;
        if (request.Prompts.Count == 0 && (needsPrompt.Count == 0 || request.Rewards.Count == 0))
        {
            // No prompts: fine for prompt-free rewards; with "every reward" requested, score only those.
            if (needsPrompt.Count > 0) scorers = scorers.Where(s => !s.NeedsPrompt).ToList();
            prompts = Enumerable.Repeat("", n).ToList();
        }
        else if (request.Prompts.Count != n)
            throw new InvalidRequestException(
                $"prompts: {request.Prompts.Count} prompts for {n} images; send one prompt per image" +
                (needsPrompt.Count > 0 ? $" ({string.Join(", ", needsPrompt)} score image-prompt pairs)" : ""));
        return new Plan(scorers, prompts, n);
    }

    private Task<DecodedImage[]> DecodeAllAsync(ScoreRequest request, CancellationToken ct) =>
        Task.WhenAll(request.Images.Select((image, i) => Task.Run(() => Decode(image, i, options.MaxPixels), ct)));

    /// <summary>One image → RGB bytes; a refusal is returned (not thrown) with the image's index in its message.</summary>
    private static DecodedImage Decode(Image image, int index, long maxPixels)
    {
        var field = $"images[{index}]";
        try
        {
            switch (image.DataCase)
            {
                case Image.DataOneofCase.Encoded:
                    try
                    {
                        // DecodeRgbBytes reads the header first and refuses sizes above MaxPixels before decoding pixels.
                        var (rgb, w, h) = ImageCodec.DecodeRgbBytes(image.Encoded.Span, new ImageDecodeOptions { MaxPixels = maxPixels });
                        return new DecodedImage(rgb, w, h, null);
                    }
                    catch (ImageDecodeException e) { throw new InvalidRequestException($"{field}.encoded: {e.Message}"); }
                case Image.DataOneofCase.Tensor:
                    return FromTensor(image.Tensor, $"{field}.tensor", maxPixels);
                default:
                    throw new InvalidRequestException($"{field}: neither encoded bytes nor a tensor is set");
            }
        }
        catch (InvalidRequestException e) { return new DecodedImage(null, 0, 0, e); }
    }

    /// <summary>
    /// float32 [3, H, W] in [0, 1] → uint8 RGB the way diffusers' <c>numpy_to_pil</c> does it:
    /// <c>(x * 255).round()</c> (round half to even, as numpy).
    /// </summary>
    private static DecodedImage FromTensor(V1.Tensor t, string field, long maxPixels)
    {
        if (t.Dtype != "float32") throw new InvalidRequestException($"{field}: dtype must be float32, got '{t.Dtype}'");
        var shape = TensorWire.ValidateLayout(t, field);
        if (shape.Length != 3 || shape[0] != 3)
            throw new InvalidRequestException($"{field}: expected shape [3, H, W], got {TensorWire.Format(shape)}");
        if (shape[1] == 0 || shape[2] == 0)
            throw new InvalidRequestException($"{field}: the image is {shape[2]}x{shape[1]}; send an image with at least one pixel");
        if (shape[1] * shape[2] > maxPixels)
            throw new InvalidRequestException($"{field}: {shape[2]}x{shape[1]} = {shape[1] * shape[2]} pixels, more than the limit of {maxPixels}");
        int h = (int)shape[1], w = (int)shape[2], plane = h * w;
        var values = TensorWire.AsFloats(t);
        var rgb = new byte[plane * 3];
        for (var i = 0; i < values.Length; i++)
        {
            var v = values[i];
            if (!float.IsFinite(v) || v < 0f || v > 1f)
                throw new InvalidRequestException(
                    $"{field}: element {i} is {v.ToString(CultureInfo.InvariantCulture)}; values must be finite and in [0, 1]");
            int c = i / plane, p = i % plane;
            rgb[p * 3 + c] = (byte)Math.Round(v * 255f, MidpointRounding.ToEven);
        }
        return new DecodedImage(rgb, w, h, null);
    }

    /// <summary>Scores the decoded images on the device thread; refused images get an error entry.</summary>
    private async Task<ScoreResponse> ScoreAsync(ScoreRequest request, Plan plan, DecodedImage[] images, CancellationToken ct)
    {
        var valid = Enumerable.Range(0, plan.Count).Where(i => images[i].Error is null).ToList();
        var scores = valid.Count == 0
            ? []
            : await executor.RunAsync(token => RunOnDevice(plan, images, valid, token), ct);
        var response = new ScoreResponse { RequestId = request.RequestId };
        for (var i = 0; i < plan.Count; i++)
        {
            var result = new ImageScores { Index = (uint)i };
            if (images[i].Error is { } e)
                result.Error = new ItemError { Code = (int)StatusCode.InvalidArgument, Message = e.Message };
            else
                result.Scores.Add(scores[valid.IndexOf(i)]);
            response.Results.Add(result);
        }
        return response;
    }

    /// <summary>Runs on the device thread inside a dispose scope and no_grad; never awaits.</summary>
    private static List<Dictionary<string, double>> RunOnDevice(Plan plan, DecodedImage[] images, List<int> valid, CancellationToken ct)
    {
        var tensors = valid.Select(i => torch.tensor(images[i].Rgb!, new long[] { images[i].Height, images[i].Width, 3 }, ScalarType.Byte)).ToList();
        var prompts = valid.Select(i => plan.Prompts[i]).ToList();
        var merged = valid.Select(_ => new Dictionary<string, double>(StringComparer.Ordinal)).ToList();
        foreach (var scorer in plan.Scorers)
        {
            ct.ThrowIfCancellationRequested();
            var rows = scorer.Score(tensors, prompts);
            for (var k = 0; k < rows.Count; k++)
                foreach (var (key, value) in rows[k]) merged[k][key] = value;
        }
        return merged;
    }
}
