using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.IO;

/// <summary>One tensor's entry in a safetensors header.</summary>
public sealed record SafeTensorInfo(string Name, string DType, long[] Shape, long Begin, long End)
{
    public long ByteLength => End - Begin;
    public long NumElements => Shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>Raised for files that are not valid safetensors (bad header, truncated data, bad offsets).</summary>
public sealed class SafeTensorsFormatException(string message) : Exception(message);

/// <summary>
/// Reads a .safetensors file through a memory map, so a multi-GB checkpoint is paged in tensor by
/// tensor instead of being read into managed memory whole (format: 8-byte LE header length, JSON
/// header, raw little-endian row-major data; huggingface/safetensors README).
/// </summary>
public sealed class SafeTensorsFile : IDisposable
{
    private readonly MemoryMappedFile? _map;
    private readonly MemoryMappedViewAccessor? _view;
    private readonly long _dataStart;
    private readonly long _fileLength;

    public string Path { get; }
    public IReadOnlyDictionary<string, SafeTensorInfo> Tensors { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }

    public const long MaxHeaderBytes = 100L * 1024 * 1024;

    private SafeTensorsFile(string path)
    {
        Path = path;
        _fileLength = new FileInfo(path).Length;
        if (_fileLength < 8) throw new SafeTensorsFormatException($"{path}: {_fileLength} bytes is too short for a safetensors file");
        Span<byte> lenBytes = stackalloc byte[8];
        using (var fs = File.OpenRead(path)) fs.ReadExactly(lenBytes);
        ulong headerLen = BitConverter.ToUInt64(lenBytes);
        if (headerLen == 0 || headerLen > MaxHeaderBytes || (long)headerLen > _fileLength - 8)
            throw new SafeTensorsFormatException($"{path}: header length {headerLen} is invalid for a {_fileLength}-byte file (truncated or not safetensors)");
        _dataStart = 8 + (long)headerLen;
        var headerBytes = new byte[headerLen];
        using (var fs = File.OpenRead(path)) { fs.Seek(8, SeekOrigin.Begin); fs.ReadExactly(headerBytes); }
        (Tensors, Metadata) = ParseHeader(path, headerBytes, _fileLength - _dataStart);
        if (_fileLength > 0)
        {
            _map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            _view = _map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
        }
    }

    public static SafeTensorsFile Open(string path) => new(path);

    private static (Dictionary<string, SafeTensorInfo>, Dictionary<string, string>) ParseHeader(string path, byte[] header, long dataLength)
    {
        JsonObject root;
        try { root = JsonNode.Parse(Encoding.UTF8.GetString(header).TrimEnd(' ', '\0'))?.AsObject() ?? throw new JsonException("null header"); }
        catch (Exception e) when (e is JsonException or InvalidOperationException or ArgumentException)
        { throw new SafeTensorsFormatException($"{path}: header is not valid JSON ({e.Message})"); }
        var tensors = new Dictionary<string, SafeTensorInfo>(StringComparer.Ordinal);
        var meta = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var (name, node) in root)
        {
            if (name == "__metadata__")
            {
                if (node is JsonObject mo) foreach (var (k, v) in mo) meta[k] = v?.ToString() ?? "";
                continue;
            }
            try
            {
                var o = node!.AsObject();
                string dtype = o["dtype"]!.GetValue<string>();
                long[] shape = o["shape"]!.AsArray().Select(x => x!.GetValue<long>()).ToArray();
                var offs = o["data_offsets"]!.AsArray();
                long b = offs[0]!.GetValue<long>(), e = offs[1]!.GetValue<long>();
                var info = new SafeTensorInfo(name, dtype, shape, b, e);
                if (b < 0 || e < b || e > dataLength)
                    throw new SafeTensorsFormatException($"{path}: tensor '{name}' spans bytes [{b},{e}) but the file holds {dataLength} data bytes (truncated?)");
                if (shape.Any(d => d < 0) || info.NumElements * ElementSize(dtype) != e - b)
                    throw new SafeTensorsFormatException($"{path}: tensor '{name}' has shape [{string.Join(",", shape)}] {dtype} but {e - b} bytes");
                tensors[name] = info;
            }
            catch (SafeTensorsFormatException) { throw; }
            catch (Exception ex) { throw new SafeTensorsFormatException($"{path}: bad header entry '{name}': {ex.Message}"); }
        }
        return (tensors, meta);
    }

    public static int ElementSize(string dtype) => dtype switch
    {
        "F64" or "I64" or "U64" => 8,
        "F32" or "I32" or "U32" => 4,
        "F16" or "BF16" or "I16" or "U16" => 2,
        "I8" or "U8" or "BOOL" or "F8_E4M3" or "F8_E5M2" => 1,
        _ => throw new SafeTensorsFormatException($"unsupported safetensors dtype '{dtype}'"),
    };

    public static ScalarType ToScalarType(string dtype) => dtype switch
    {
        "F64" => ScalarType.Float64,
        "F32" => ScalarType.Float32,
        "F16" => ScalarType.Float16,
        "BF16" => ScalarType.BFloat16,
        "I64" => ScalarType.Int64,
        "I32" => ScalarType.Int32,
        "I16" => ScalarType.Int16,
        "I8" => ScalarType.Int8,
        "U8" => ScalarType.Byte,
        "BOOL" => ScalarType.Bool,
        _ => throw new SafeTensorsFormatException($"unsupported safetensors dtype '{dtype}'"),
    };

    public static string FromScalarType(ScalarType t) => t switch
    {
        ScalarType.Float64 => "F64",
        ScalarType.Float32 => "F32",
        ScalarType.Float16 => "F16",
        ScalarType.BFloat16 => "BF16",
        ScalarType.Int64 => "I64",
        ScalarType.Int32 => "I32",
        ScalarType.Int16 => "I16",
        ScalarType.Int8 => "I8",
        ScalarType.Byte => "U8",
        ScalarType.Bool => "BOOL",
        _ => throw new ArgumentException($"dtype {t} cannot be written to safetensors"),
    };

    public bool Contains(string name) => Tensors.ContainsKey(name);

    /// <summary>Copies one tensor out of the map into a new CPU tensor (optionally cast / moved).</summary>
    public unsafe Tensor Load(string name, ScalarType? dtype = null, Device? device = null)
    {
        if (!Tensors.TryGetValue(name, out var info)) throw new KeyNotFoundException($"{Path}: no tensor named '{name}'");
        var t = empty(info.Shape, ToScalarType(info.DType));
        if (info.ByteLength > 0)
        {
            byte* src = null;
            _view!.SafeMemoryMappedViewHandle.AcquirePointer(ref src);
            try
            {
                src += _view.PointerOffset + _dataStart + info.Begin;
                Buffer.MemoryCopy(src, (void*)DataPtr(t), info.ByteLength, info.ByteLength);
            }
            finally { _view.SafeMemoryMappedViewHandle.ReleasePointer(); }
        }
        if (dtype is { } dt && dt != t.dtype && t.is_floating_point()) t = t.to_type(dt, disposeAfter: true);
        if (device is not null && device.type != DeviceType.CPU) t = t.to(device, disposeAfter: true);
        return t;
    }

    /// <summary>Pointer to a contiguous CPU tensor's storage (TorchSharp exposes it as a Span).</summary>
    public static unsafe IntPtr DataPtr(Tensor t)
    {
        fixed (byte* p = t.bytes) return (IntPtr)p;
    }

    public void Dispose()
    {
        _view?.Dispose();
        _map?.Dispose();
    }

    /// <summary>
    /// Writes tensors as safetensors atomically (temp file in the same folder, then rename), so a
    /// reader never sees a half-written checkpoint.
    /// </summary>
    public static void Save(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var dir = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!;
        Directory.CreateDirectory(dir);
        var tmp = System.IO.Path.Combine(dir, $".{System.IO.Path.GetFileName(path)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
                Write(fs, tensors, metadata);
            File.Move(tmp, path, overwrite: true);
        }
        finally { if (File.Exists(tmp)) File.Delete(tmp); }
    }

    /// <summary>Serialises to a stream (used for exports that are streamed to clients).</summary>
    public static unsafe void Write(Stream output, IEnumerable<KeyValuePair<string, Tensor>> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal)
            .Select(kv => (kv.Key, T: kv.Value.detach().cpu().contiguous())).ToList();
        try
        {
            var header = new JsonObject();
            if (metadata is { Count: > 0 })
            {
                var m = new JsonObject();
                foreach (var (k, v) in metadata) m[k] = v;
                header["__metadata__"] = m;
            }
            long offset = 0;
            foreach (var (name, t) in list)
            {
                long n = t.numel() * t.ElementSize;
                header[name] = new JsonObject
                {
                    ["dtype"] = FromScalarType(t.dtype),
                    ["shape"] = new JsonArray(t.shape.Select(d => (JsonNode)JsonValue.Create(d)!).ToArray()),
                    ["data_offsets"] = new JsonArray(offset, offset + n),
                };
                offset += n;
            }
            var hb = Encoding.UTF8.GetBytes(header.ToJsonString());
            int pad = (8 - hb.Length % 8) % 8;
            var padded = new byte[hb.Length + pad];
            hb.CopyTo(padded, 0);
            for (int i = hb.Length; i < padded.Length; i++) padded[i] = (byte)' ';
            output.Write(BitConverter.GetBytes((ulong)padded.Length));
            output.Write(padded);
            foreach (var (_, t) in list)
            {
                long n = t.numel() * t.ElementSize;
                if (n == 0) continue;
                var span = new ReadOnlySpan<byte>((void*)DataPtr(t), checked((int)n));
                output.Write(span);
            }
        }
        finally { foreach (var (_, t) in list) t.Dispose(); }
    }
}

/// <summary>
/// A checkpoint that may be one file or a sharded set described by <c>*.safetensors.index.json</c>
/// (<c>{"weight_map": {name: shard}}</c>), as diffusers and transformers write them.
/// </summary>
public sealed class SafeTensorsCheckpoint : IDisposable
{
    private readonly Dictionary<string, SafeTensorsFile> _byName = new(StringComparer.Ordinal);
    private readonly List<SafeTensorsFile> _files = new();

    public IEnumerable<string> Keys => _byName.Keys;
    public IReadOnlyList<SafeTensorsFile> Files => _files;

    private SafeTensorsCheckpoint() { }

    public static SafeTensorsCheckpoint Open(string path)
    {
        var ck = new SafeTensorsCheckpoint();
        try
        {
            if (path.EndsWith(".index.json", StringComparison.Ordinal))
            {
                var dir = System.IO.Path.GetDirectoryName(path)!;
                var root = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
                var map = root["weight_map"]?.AsObject() ?? throw new SafeTensorsFormatException($"{path}: no weight_map");
                var shards = new Dictionary<string, SafeTensorsFile>();
                foreach (var (name, shardNode) in map)
                {
                    var shard = shardNode!.GetValue<string>();
                    if (shard.Contains("..") || System.IO.Path.IsPathRooted(shard))
                        throw new SafeTensorsFormatException($"{path}: shard path '{shard}' escapes the folder");
                    if (!shards.TryGetValue(shard, out var f))
                    {
                        f = SafeTensorsFile.Open(System.IO.Path.Combine(dir, shard));
                        shards[shard] = f;
                        ck._files.Add(f);
                    }
                    if (!f.Contains(name)) throw new SafeTensorsFormatException($"{path}: '{name}' is mapped to {shard} but that shard lacks it");
                    ck._byName[name] = f;
                }
            }
            else
            {
                var f = SafeTensorsFile.Open(path);
                ck._files.Add(f);
                foreach (var k in f.Tensors.Keys) ck._byName[k] = f;
            }
            return ck;
        }
        catch { ck.Dispose(); throw; }
    }

    /// <summary>Finds the weights of a model folder: <c>{stem}.safetensors</c> or its sharded index.</summary>
    public static SafeTensorsCheckpoint OpenFolder(string folder, params string[] stems)
    {
        foreach (var stem in stems)
        {
            var single = System.IO.Path.Combine(folder, stem + ".safetensors");
            if (File.Exists(single)) return Open(single);
            var index = single + ".index.json";
            if (File.Exists(index)) return Open(index);
        }
        if (stems.Any(s => File.Exists(System.IO.Path.Combine(folder, s + ".bin"))) || File.Exists(System.IO.Path.Combine(folder, "pytorch_model.bin")))
            throw new FileNotFoundException($"{folder} holds only pickle (.bin) weights; RealAlign never unpickles. Convert them to safetensors first.");
        throw new FileNotFoundException($"{folder}: none of {string.Join(", ", stems.Select(s => s + ".safetensors"))} (or sharded index) found");
    }

    public bool Contains(string name) => _byName.ContainsKey(name);
    public SafeTensorInfo Info(string name) => _byName[name].Tensors[name];
    public Tensor Load(string name, ScalarType? dtype = null, Device? device = null) =>
        _byName.TryGetValue(name, out var f) ? f.Load(name, dtype, device) : throw new KeyNotFoundException($"checkpoint has no tensor '{name}'");

    public void Dispose() { foreach (var f in _files) f.Dispose(); }
}
