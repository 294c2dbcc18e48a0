using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using RealAlign.Core.IO;

namespace RealAlign.Core.Models.Clip;

/// <summary>
/// transformers <c>CLIPTextConfig</c> (configuration_clip.py); defaults are upstream's, so a config.json
/// that omits a key (as CLIPModel's nested <c>text_config</c> often does) reads the same as in Python.
/// </summary>
public sealed record CLIPTextConfig
{
    [JsonPropertyName("vocab_size")] public int VocabSize { get; init; } = 49408;
    [JsonPropertyName("hidden_size")] public int HiddenSize { get; init; } = 512;
    [JsonPropertyName("intermediate_size")] public int IntermediateSize { get; init; } = 2048;
    /// <summary>Null when the file does not say; see <see cref="ProjectionDimOrDefault"/>.</summary>
    [JsonPropertyName("projection_dim")] public int? ProjectionDim { get; init; }
    [JsonPropertyName("num_hidden_layers")] public int NumHiddenLayers { get; init; } = 12;
    [JsonPropertyName("num_attention_heads")] public int NumAttentionHeads { get; init; } = 8;
    [JsonPropertyName("max_position_embeddings")] public int MaxPositionEmbeddings { get; init; } = 77;
    [JsonPropertyName("hidden_act")] public string HiddenAct { get; init; } = "quick_gelu";
    [JsonPropertyName("layer_norm_eps")] public double LayerNormEps { get; init; } = 1e-5;
    [JsonPropertyName("attention_dropout")] public double AttentionDropout { get; init; }
    [JsonPropertyName("pad_token_id")] public int? PadTokenId { get; init; } = 1;
    [JsonPropertyName("bos_token_id")] public int? BosTokenId { get; init; } = 49406;
    /// <summary>2 in legacy configs (openai CLIP-L), which switches pooling to argmax(input_ids).</summary>
    [JsonPropertyName("eos_token_id")] public int? EosTokenId { get; init; } = 49407;

    public int ProjectionDimOrDefault => ProjectionDim ?? 512;

    /// <summary>
    /// Reads a text config from a <c>clip_text_model</c> config.json or from a <c>clip</c> one's
    /// <c>text_config</c>. In the latter case a missing <c>projection_dim</c> is taken from the top level
    /// (transformers would fall back to 512 there, which cannot load such a checkpoint's text_projection).
    /// </summary>
    public static CLIPTextConfig FromFile(string configPath) =>
        ClipConfigReader.ReadTower<CLIPTextConfig>(configPath, "text_config", (c, p) => c.ProjectionDim is null ? c with { ProjectionDim = p } : c);
}

/// <summary>transformers <c>CLIPVisionConfig</c> (configuration_clip.py), upstream defaults.</summary>
public sealed record CLIPVisionConfig
{
    [JsonPropertyName("hidden_size")] public int HiddenSize { get; init; } = 768;
    [JsonPropertyName("intermediate_size")] public int IntermediateSize { get; init; } = 3072;
    [JsonPropertyName("projection_dim")] public int? ProjectionDim { get; init; }
    [JsonPropertyName("num_hidden_layers")] public int NumHiddenLayers { get; init; } = 12;
    [JsonPropertyName("num_attention_heads")] public int NumAttentionHeads { get; init; } = 12;
    [JsonPropertyName("num_channels")] public int NumChannels { get; init; } = 3;
    [JsonPropertyName("image_size")] public int ImageSize { get; init; } = 224;
    [JsonPropertyName("patch_size")] public int PatchSize { get; init; } = 32;
    [JsonPropertyName("hidden_act")] public string HiddenAct { get; init; } = "quick_gelu";
    [JsonPropertyName("layer_norm_eps")] public double LayerNormEps { get; init; } = 1e-5;
    [JsonPropertyName("attention_dropout")] public double AttentionDropout { get; init; }

    public int ProjectionDimOrDefault => ProjectionDim ?? 512;

    /// <summary>As <see cref="CLIPTextConfig.FromFile"/>, for <c>clip_vision_model</c> or a <c>clip</c> config's <c>vision_config</c>.</summary>
    public static CLIPVisionConfig FromFile(string configPath) =>
        ClipConfigReader.ReadTower<CLIPVisionConfig>(configPath, "vision_config", (c, p) => c.ProjectionDim is null ? c with { ProjectionDim = p } : c);
}

/// <summary>transformers <c>CLIPConfig</c>: both towers plus the shared projection size and logit scale init.</summary>
public sealed record CLIPConfig
{
    [JsonPropertyName("text_config")] public CLIPTextConfig TextConfig { get; init; } = new();
    [JsonPropertyName("vision_config")] public CLIPVisionConfig VisionConfig { get; init; } = new();
    [JsonPropertyName("projection_dim")] public int ProjectionDim { get; init; } = 512;
    /// <summary>ln(1/0.07); only the initial value of the <c>logit_scale</c> parameter.</summary>
    [JsonPropertyName("logit_scale_init_value")] public double LogitScaleInitValue { get; init; } = 2.6592;

    public static CLIPConfig FromFile(string configPath)
    {
        var root = ClipConfigReader.Parse(configPath);
        var type = root["model_type"]?.GetValue<string>();
        if (type is not null and not "clip")
            throw new InvalidDataException($"{configPath}: model_type '{type}' is not a CLIPModel config (expected 'clip')");
        return root.Deserialize<CLIPConfig>(ModelLoading.ConfigJson) ?? throw new InvalidDataException($"{configPath}: empty config");
    }
}

internal static class ClipConfigReader
{
    public static JsonObject Parse(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"config not found: {path}");
        return JsonNode.Parse(File.ReadAllText(path), documentOptions: new JsonDocumentOptions
        {
            CommentHandling = JsonCommentHandling.Skip,
            AllowTrailingCommas = true,
        })?.AsObject() ?? throw new InvalidDataException($"{path}: empty config");
    }

    /// <summary>Like transformers' sub-config <c>from_pretrained</c>: a <c>clip</c> config yields its nested tower config.</summary>
    public static T ReadTower<T>(string path, string nestedKey, Func<T, int?, T> withTopLevelProjection)
    {
        var root = Parse(path);
        if (root["model_type"]?.GetValue<string>() == "clip" || (root[nestedKey] is JsonObject && root["hidden_size"] is null))
        {
            var nested = root[nestedKey] as JsonObject ?? new JsonObject();
            var tower = nested.Deserialize<T>(ModelLoading.ConfigJson)!;
            int? topProjection = root["projection_dim"] is JsonValue v ? v.GetValue<int>() : 512;
            return withTopLevelProjection(tower, topProjection);
        }
        return root.Deserialize<T>(ModelLoading.ConfigJson) ?? throw new InvalidDataException($"{path}: empty config");
    }
}
