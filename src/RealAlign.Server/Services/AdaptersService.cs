using Google.Protobuf;
using Grpc.Core;
using RealAlign.Core.Lora;
using RealAlign.Server.Observability;
using RealAlign.V1;

namespace RealAlign.Server.Services;

/// <summary>
/// realalign.v1.Adapters: a thin layer over <see cref="AdapterRegistry"/>. Registry and format errors
/// (AdapterException, LoraFormatException) are mapped to status codes by ExceptionInterceptor.
/// </summary>
public sealed class AdaptersService(AdapterBackboneBinder binder, ILogger<AdaptersService> log) : V1.Adapters.AdaptersBase
{
    /// <summary>Export and upload chunk size: well under gRPC's default 4 MB receive limit of clients.</summary>
    public const int ChunkBytes = 1 << 20;

    private static readonly string[] UploadExtensions = [".safetensors", ".json"];

    private AdapterRegistry Registry => binder.Adapters;

    public override async Task<AdapterInfo> Load(LoadAdapterRequest request, ServerCallContext context)
    {
        RequestLog.Of(context).Backbone = request.Backbone;
        if (Registry.Options.AdaptersRoot is null)
            throw new RpcException(new Status(StatusCode.FailedPrecondition,
                "Load: this server was started without --adapters-root, so it reads no adapter files; use Upload"));
        AdapterRegistry.ValidateName(request.Name);
        var bb = await binder.EnsureAsync(request.Backbone, context.CancellationToken);
        // Parsing and validating is blocking file and tensor work: keep it off the request thread.
        var v = await Task.Run(() => Registry.Load(request.Name, bb.Name, request.Path), context.CancellationToken);
        log.LogInformation("Loaded adapter {Adapter} v{Version} ({Format}, r={Rank}, {Modules} modules) for {Backbone} from {Source}",
            v.Name, v.Version, v.Format, v.Rank, v.Weights.Modules.Count, v.Backbone, v.Source);
        return AdapterBackboneBinder.ToInfo(v);
    }

    public override async Task<AdapterInfo> Upload(IAsyncStreamReader<UploadAdapterChunk> requestStream, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        if (!await requestStream.MoveNext(ct) || requestStream.Current.PartCase != UploadAdapterChunk.PartOneofCase.Header)
            throw new InvalidRequestException("Upload: the first message must carry the header (name, backbone, format, filename)");
        var header = requestStream.Current.Header;
        RequestLog.Of(context).Backbone = header.Backbone;
        AdapterRegistry.ValidateName(header.Name);
        var format = string.IsNullOrEmpty(header.Format) ? null : header.Format.ToLowerInvariant();
        if (format is not null && !LoraFormats.KnownFormats.Contains(format))
            throw new InvalidRequestException($"format: '{header.Format}' is not one of {string.Join(", ", LoraFormats.KnownFormats)}");
        var bb = await binder.EnsureAsync(header.Backbone, ct);

        // Staged in a private folder of the server's own choosing, then loaded from there and deleted.
        var dir = Directory.CreateTempSubdirectory("realalign-upload-");
        try
        {
            var files = new List<string>();
            long total = 0;
            FileStream? current = null;
            try
            {
                current = Open(header.Filename);
                while (await requestStream.MoveNext(ct))
                {
                    var chunk = requestStream.Current;
                    switch (chunk.PartCase)
                    {
                        case UploadAdapterChunk.PartOneofCase.Data:
                            total += chunk.Data.Length;
                            if (total > Registry.Options.MaxUploadBytes)
                                throw new InvalidRequestException($"Upload: more than {Registry.Options.MaxUploadBytes} bytes");
                            await current.WriteAsync(chunk.Data.Memory, ct);
                            break;
                        case UploadAdapterChunk.PartOneofCase.NextFile:
                            await current.DisposeAsync();
                            current = Open(chunk.NextFile);
                            break;
                        default:
                            throw new InvalidRequestException("Upload: only the first message may carry a header");
                    }
                }
            }
            finally
            {
                if (current is not null) await current.DisposeAsync();
            }
            if (total == 0) throw new InvalidRequestException("Upload: no file bytes received");

            var path = files.Count == 1 ? files[0] : dir.FullName;
            var v = await Task.Run(() => Registry.LoadTrusted(header.Name, bb.Name, path, format, "upload:" + string.Join("+", files.Select(Path.GetFileName))), ct);
            log.LogInformation("Uploaded adapter {Adapter} v{Version} ({Format}, r={Rank}, {Bytes} bytes) for {Backbone}",
                v.Name, v.Version, v.Format, v.Rank, total, v.Backbone);
            return AdapterBackboneBinder.ToInfo(v);

            FileStream Open(string filename)
            {
                if (string.IsNullOrEmpty(filename) || filename.Length > 255 || Path.GetFileName(filename) != filename
                    || filename.StartsWith('.') || filename.Contains('\\') || !UploadExtensions.Any(e => filename.EndsWith(e, StringComparison.OrdinalIgnoreCase)))
                    throw new InvalidRequestException($"Upload: filename '{filename}' must be a plain .safetensors or .json file name");
                var p = Path.Combine(dir.FullName, filename);
                if (files.Contains(p)) throw new InvalidRequestException($"Upload: file '{filename}' sent twice");
                files.Add(p);
                return new FileStream(p, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 16, useAsync: true);
            }
        }
        finally
        {
            try { dir.Delete(recursive: true); }
            catch (IOException e) { log.LogWarning(e, "Could not delete upload staging folder {Dir}", dir.FullName); }
        }
    }

    public override Task<AdapterInfo> Unload(UnloadAdapterRequest request, ServerCallContext context)
    {
        var v = Registry.Unload(request.Name);
        log.LogInformation("Unloaded adapter {Adapter} v{Version}", v.Name, v.Version);
        return Task.FromResult(AdapterBackboneBinder.ToInfo(v));
    }

    public override Task<ListAdaptersResponse> List(ListAdaptersRequest request, ServerCallContext context)
    {
        var response = new ListAdaptersResponse();
        response.Adapters.AddRange(Registry.List()
            .Where(v => string.IsNullOrEmpty(request.Backbone) || v.Backbone == request.Backbone)
            .Select(AdapterBackboneBinder.ToInfo));
        return Task.FromResult(response);
    }

    public override Task<AdapterInfo> Get(GetAdapterRequest request, ServerCallContext context) =>
        Task.FromResult(AdapterBackboneBinder.ToInfo(Registry.Get(request.Name)
            ?? throw new AdapterException(AdapterErrorKind.NotFound, $"no adapter named '{request.Name}' is loaded")));

    public override async Task Export(ExportAdapterRequest request, IServerStreamWriter<ExportAdapterChunk> responseStream, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        var format = string.IsNullOrEmpty(request.Format) ? "diffusers" : request.Format.ToLowerInvariant();
        if (format is not ("diffusers" or "peft"))
            throw new InvalidRequestException($"format: '{request.Format}' is not one of diffusers, peft");
        // The lease keeps this version's tensors alive even if it is unloaded or swapped meanwhile.
        using var lease = Registry.Acquire([request.Name]);
        var w = lease[request.Name].Weights;
        var files = format == "diffusers"
            ? new (string, Action<Stream>)[] { (LoraFormats.DiffusersWeightName, s => LoraFormats.WriteDiffusers(w, s)) }
            : [
                (LoraFormats.PeftConfigName, s => s.Write(System.Text.Encoding.UTF8.GetBytes(LoraFormats.PeftConfigText(w)))),
                (LoraFormats.PeftWeightName, s => LoraFormats.WritePeftWeights(w, s)),
            ];
        foreach (var (filename, write) in files)
        {
            // Serialised to an unnamed temp file, then streamed: the export never sits whole in managed memory.
            await using var tmp = new FileStream(Path.GetTempFileName(), FileMode.Open, FileAccess.ReadWrite, FileShare.None, 1 << 16, FileOptions.DeleteOnClose);
            await Task.Run(() => write(tmp), ct);
            tmp.Position = 0;
            var buffer = new byte[ChunkBytes];
            ulong offset = 0;
            int n;
            do
            {
                n = await tmp.ReadAsync(buffer, ct);
                // An empty file still gets one (empty) chunk, so the client learns its name.
                if (n > 0 || offset == 0)
                    await responseStream.WriteAsync(new ExportAdapterChunk { Filename = filename, Offset = offset, Data = ByteString.CopyFrom(buffer, 0, n) }, ct);
                offset += (ulong)n;
            } while (n > 0);
        }
    }
}
