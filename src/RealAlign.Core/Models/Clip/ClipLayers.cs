using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models.Clip;

// Building blocks of transformers src/transformers/models/clip/modeling_clip.py (v4.45, eager attention).
// Field names are the upstream attribute names, hence the checkpoint keys.

/// <summary>Token + learned absolute position embeddings.</summary>
public sealed class CLIPTextEmbeddings : nn.Module<Tensor, Tensor>
{
    public Embedding token_embedding;
    public Embedding position_embedding;

    public CLIPTextEmbeddings(CLIPTextConfig config) : base(nameof(CLIPTextEmbeddings))
    {
        token_embedding = nn.Embedding(config.VocabSize, config.HiddenSize);
        position_embedding = nn.Embedding(config.MaxPositionEmbeddings, config.HiddenSize);
        // Upstream's position_ids buffer is non-persistent (absent from checkpoints); it is arange(seq), built per call.
        RegisterComponents();
    }

    public override Tensor forward(Tensor input_ids)
    {
        long seq = input_ids.shape[^1];
        long max = position_embedding.weight!.shape[0];
        if (seq > max)
            throw new ArgumentException($"sequence length {seq} exceeds max_position_embeddings {max}", nameof(input_ids));
        using var position_ids = arange(seq, dtype: ScalarType.Int64, device: input_ids.device).unsqueeze(0);
        return token_embedding.forward(input_ids) + position_embedding.forward(position_ids);
    }
}

/// <summary>[CLS] + non-overlapping patch projection (conv without bias) + learned position embeddings.</summary>
public sealed class CLIPVisionEmbeddings : nn.Module<Tensor, Tensor>
{
    public Parameter class_embedding;
    public Conv2d patch_embedding;
    public Embedding position_embedding;

    private readonly int _imageSize;
    private readonly long _numPositions;

    public CLIPVisionEmbeddings(CLIPVisionConfig config) : base(nameof(CLIPVisionEmbeddings))
    {
        _imageSize = config.ImageSize;
        class_embedding = new Parameter(randn(config.HiddenSize));
        patch_embedding = nn.Conv2d(config.NumChannels, config.HiddenSize, kernel_size: config.PatchSize, stride: config.PatchSize, bias: false);
        long numPatches = (long)(config.ImageSize / config.PatchSize) * (config.ImageSize / config.PatchSize);
        _numPositions = numPatches + 1;
        position_embedding = nn.Embedding(_numPositions, config.HiddenSize);
        RegisterComponents();
    }

    public override Tensor forward(Tensor pixel_values)
    {
        long batch = pixel_values.shape[0], height = pixel_values.shape[2], width = pixel_values.shape[3];
        // interpolate_pos_encoding is not supported, so other sizes are an error as upstream's default.
        if (height != _imageSize || width != _imageSize)
            throw new ArgumentException($"input image size ({height}*{width}) doesn't match model ({_imageSize}*{_imageSize})", nameof(pixel_values));
        using var scope = NewDisposeScope();
        var patch_embeds = patch_embedding.forward(pixel_values.to(patch_embedding.weight!.dtype)); // [B, E, grid, grid]
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2);
        var class_embeds = class_embedding.expand(batch, 1, -1);
        var embeddings = cat([class_embeds, patch_embeds], 1);
        var position_ids = arange(_numPositions, dtype: ScalarType.Int64, device: embeddings.device).unsqueeze(0);
        return (embeddings + position_embedding.forward(position_ids)).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// Multi-head attention, eager path: softmax(q·kᵀ/√d + mask)·v with the additive mask already combined
/// (causal and/or padding, <see cref="CLIPTextTransformer"/>). Like v4.45 the query is scaled before
/// the product; the softmax runs in float32 (as newer transformers' eager path) for fp16/bf16 safety.
/// </summary>
public sealed class CLIPAttention : nn.Module<Tensor, Tensor?, Tensor>
{
    public LoRACompatibleLinear k_proj;
    public LoRACompatibleLinear v_proj;
    public LoRACompatibleLinear q_proj;
    public LoRACompatibleLinear out_proj;

    private readonly long _embedDim, _numHeads, _headDim;
    private readonly double _scale;

    public CLIPAttention(int hiddenSize, int numHeads) : base(nameof(CLIPAttention))
    {
        _embedDim = hiddenSize;
        _numHeads = numHeads;
        _headDim = hiddenSize / numHeads;
        if (_headDim * numHeads != hiddenSize)
            throw new ArgumentException($"embed_dim must be divisible by num_heads (got embed_dim: {hiddenSize} and num_heads: {numHeads})");
        _scale = Math.Pow(_headDim, -0.5);
        k_proj = new LoRACompatibleLinear(hiddenSize, hiddenSize);
        v_proj = new LoRACompatibleLinear(hiddenSize, hiddenSize);
        q_proj = new LoRACompatibleLinear(hiddenSize, hiddenSize);
        out_proj = new LoRACompatibleLinear(hiddenSize, hiddenSize);
        RegisterComponents();
    }

    /// <param name="hidden_states">[B, S, E]</param>
    /// <param name="attention_mask">additive, broadcastable to [B, heads, S, S], or null</param>
    public override Tensor forward(Tensor hidden_states, Tensor? attention_mask)
    {
        using var scope = NewDisposeScope();
        long b = hidden_states.shape[0], s = hidden_states.shape[1];
        var query = (q_proj.forward(hidden_states) * _scale).view(b, s, _numHeads, _headDim).transpose(1, 2);
        var key = k_proj.forward(hidden_states).view(b, s, _numHeads, _headDim).transpose(1, 2);
        var value = v_proj.forward(hidden_states).view(b, s, _numHeads, _headDim).transpose(1, 2);

        var attn_weights = matmul(query, key.transpose(-1, -2));
        if (attention_mask is not null) attn_weights = attn_weights + attention_mask;
        attn_weights = nn.functional.softmax(attn_weights, -1, ScalarType.Float32).to(query.dtype);

        var attn_output = matmul(attn_weights, value).transpose(1, 2).reshape(b, s, _embedDim);
        return out_proj.forward(attn_output).MoveToOuterDisposeScope();
    }
}

/// <summary>fc1 → activation (config <c>hidden_act</c>) → fc2.</summary>
public sealed class CLIPMLP : nn.Module<Tensor, Tensor>
{
    public LoRACompatibleLinear fc1;
    public LoRACompatibleLinear fc2;

    private readonly string _act;

    public CLIPMLP(int hiddenSize, int intermediateSize, string hiddenAct) : base(nameof(CLIPMLP))
    {
        _act = hiddenAct;
        _ = Activation(hiddenAct, null); // reject unknown names at construction
        fc1 = new LoRACompatibleLinear(hiddenSize, intermediateSize);
        fc2 = new LoRACompatibleLinear(intermediateSize, hiddenSize);
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states)
    {
        using var scope = NewDisposeScope();
        var h = Activation(_act, fc1.forward(hidden_states))!;
        return fc2.forward(h).MoveToOuterDisposeScope();
    }

    /// <summary>The transformers ACT2FN entries CLIP checkpoints use.</summary>
    internal static Tensor? Activation(string name, Tensor? x) => name switch
    {
        // QuickGELUActivation: x * sigmoid(1.702 x)
        "quick_gelu" => x is null ? null : x * torch.sigmoid(x * 1.702),
        "gelu" => x is null ? null : nn.functional.gelu(x),
        // NewGELUActivation / PytorchGELUTanh: 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))
        "gelu_new" or "gelu_pytorch_tanh" or "gelu_fast" => x is null ? null
            : 0.5 * x * (1.0 + torch.tanh(Math.Sqrt(2.0 / Math.PI) * (x + 0.044715 * x.pow(3)))),
        _ => throw new NotSupportedException($"CLIP hidden_act '{name}' is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)"),
    };
}

/// <summary>Pre-norm transformer block: x + attn(ln1(x)); x + mlp(ln2(x)).</summary>
public sealed class CLIPEncoderLayer : nn.Module<Tensor, Tensor?, Tensor>
{
    public CLIPAttention self_attn;
    public LayerNorm layer_norm1;
    public CLIPMLP mlp;
    public LayerNorm layer_norm2;

    public CLIPEncoderLayer(int hiddenSize, int intermediateSize, int numHeads, string hiddenAct, double layerNormEps)
        : base(nameof(CLIPEncoderLayer))
    {
        self_attn = new CLIPAttention(hiddenSize, numHeads);
        layer_norm1 = nn.LayerNorm(hiddenSize, layerNormEps);
        mlp = new CLIPMLP(hiddenSize, intermediateSize, hiddenAct);
        layer_norm2 = nn.LayerNorm(hiddenSize, layerNormEps);
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states, Tensor? attention_mask)
    {
        using var scope = NewDisposeScope();
        var h = hidden_states + self_attn.forward(layer_norm1.forward(hidden_states), attention_mask);
        h = h + mlp.forward(layer_norm2.forward(h));
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// The stack of <see cref="CLIPEncoderLayer"/>s. Returns every hidden state as transformers'
/// <c>output_hidden_states=True</c>: the input first, then each layer's output (the last one is the
/// encoder output, before any final norm).
/// </summary>
public sealed class CLIPEncoder : nn.Module<Tensor, Tensor?, IReadOnlyList<Tensor>>
{
    public ModuleList<CLIPEncoderLayer> layers;

    public CLIPEncoder(int numLayers, int hiddenSize, int intermediateSize, int numHeads, string hiddenAct, double layerNormEps)
        : base(nameof(CLIPEncoder))
    {
        layers = new ModuleList<CLIPEncoderLayer>();
        for (int i = 0; i < numLayers; i++)
            layers.Add(new CLIPEncoderLayer(hiddenSize, intermediateSize, numHeads, hiddenAct, layerNormEps));
        RegisterComponents();
    }

    public CLIPEncoder(CLIPTextConfig c) : this(c.NumHiddenLayers, c.HiddenSize, c.IntermediateSize, c.NumAttentionHeads, c.HiddenAct, c.LayerNormEps) { }
    public CLIPEncoder(CLIPVisionConfig c) : this(c.NumHiddenLayers, c.HiddenSize, c.IntermediateSize, c.NumAttentionHeads, c.HiddenAct, c.LayerNormEps) { }

    public override IReadOnlyList<Tensor> forward(Tensor inputs_embeds, Tensor? attention_mask)
    {
        var hidden_states = new List<Tensor>(layers.Count + 1) { inputs_embeds };
        var h = inputs_embeds;
        foreach (var layer in layers)
        {
            h = layer.forward(h, attention_mask);
            hidden_states.Add(h);
        }
        return hidden_states;
    }
}
