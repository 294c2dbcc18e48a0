using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace RealAlign.Core.Models.OpenClip;

/// <summary>
/// torch.nn.MultiheadAttention as open_clip uses it (self-attention, packed <c>in_proj_weight</c>
/// [3E, E] / <c>in_proj_bias</c> [3E], <c>out_proj</c>), so the checkpoint keys are the same. Works
/// batch-first; upstream permutes to [L, N, E] around the transformer, which gives the same result.
/// </summary>
public sealed class MultiheadAttention : nn.Module<Tensor, Tensor?, Tensor>
{
    private readonly int _numHeads;

    public Parameter in_proj_weight;
    public Parameter in_proj_bias;
    public LoRACompatibleLinear out_proj;

    public MultiheadAttention(int embedDim, int numHeads) : base(nameof(MultiheadAttention))
    {
        if (embedDim % numHeads != 0) throw new ArgumentException($"embed_dim {embedDim} is not divisible by num_heads {numHeads}");
        _numHeads = numHeads;
        in_proj_weight = new Parameter(torch.empty(3L * embedDim, embedDim));
        in_proj_bias = new Parameter(torch.zeros(3L * embedDim));
        out_proj = new LoRACompatibleLinear(embedDim, embedDim);
        using (torch.no_grad()) nn.init.xavier_uniform_(in_proj_weight);
        RegisterComponents();
    }

    /// <param name="x">[N, L, E]</param>
    /// <param name="attnMask">additive float mask [L, L] (−inf where attention is not allowed), or null</param>
    public override Tensor forward(Tensor x, Tensor? attnMask)
    {
        using var scope = NewDisposeScope();
        long n = x.shape[0], l = x.shape[1], e = x.shape[2];
        var qkv = nn.functional.linear(x, in_proj_weight, in_proj_bias).chunk(3, -1);
        Tensor Heads(Tensor t) => t.reshape(n, l, _numHeads, e / _numHeads).transpose(1, 2);
        var mask = attnMask?.to(x.dtype);
        var o = nn.functional.scaled_dot_product_attention(Heads(qkv[0]), Heads(qkv[1]), Heads(qkv[2]), mask);
        o = o.transpose(1, 2).reshape(n, l, e);
        return out_proj.forward(o).MoveToOuterDisposeScope();
    }
}

/// <summary>open_clip <c>LayerScale</c>: x · gamma (parameter <c>gamma</c>).</summary>
public sealed class LayerScale : nn.Module<Tensor, Tensor>
{
    public Parameter gamma;

    public LayerScale(int dim, double initValue) : base(nameof(LayerScale))
    {
        gamma = new Parameter(torch.full(dim, initValue));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => x * gamma;
}

/// <summary>The block MLP, upstream an <c>nn.Sequential(c_fc, gelu, c_proj)</c>; the GELU has no parameters.</summary>
public sealed class ResidualMlp : nn.Module<Tensor, Tensor>
{
    private readonly bool _quickGelu;

    public LoRACompatibleLinear c_fc;
    public LoRACompatibleLinear c_proj;

    public ResidualMlp(int width, int hidden, bool quickGelu) : base("mlp")
    {
        _quickGelu = quickGelu;
        c_fc = new LoRACompatibleLinear(width, hidden);
        c_proj = new LoRACompatibleLinear(hidden, width);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = c_fc.forward(x);
        // nn.GELU() is the exact erf form; QuickGELU is x·sigmoid(1.702x) (OpenAI-trained weights).
        h = _quickGelu ? h * torch.sigmoid(1.702 * h) : nn.functional.gelu(h);
        return c_proj.forward(h).MoveToOuterDisposeScope();
    }
}

/// <summary>open_clip <c>ResidualAttentionBlock</c> (pre-LN): x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x))).</summary>
public sealed class ResidualAttentionBlock : nn.Module<Tensor, Tensor?, Tensor>
{
    public LayerNorm ln_1;
    public MultiheadAttention attn;
    public LayerScale? ls_1;
    public LayerNorm ln_2;
    public ResidualMlp mlp;
    public LayerScale? ls_2;

    public ResidualAttentionBlock(int width, int heads, double mlpRatio, double? lsInitValue, bool quickGelu)
        : base(nameof(ResidualAttentionBlock))
    {
        ln_1 = nn.LayerNorm(width);
        attn = new MultiheadAttention(width, heads);
        ls_1 = lsInitValue is double a ? new LayerScale(width, a) : null;
        ln_2 = nn.LayerNorm(width);
        mlp = new ResidualMlp(width, (int)(width * mlpRatio), quickGelu);
        ls_2 = lsInitValue is double b ? new LayerScale(width, b) : null;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor? attnMask)
    {
        using var scope = NewDisposeScope();
        var a = attn.forward(ln_1.forward(x), attnMask);
        x = x + (ls_1 is null ? a : ls_1.forward(a));
        var m = mlp.forward(ln_2.forward(x));
        x = x + (ls_2 is null ? m : ls_2.forward(m));
        return x.MoveToOuterDisposeScope();
    }
}

/// <summary>open_clip <c>Transformer</c>: <c>resblocks.N</c>.</summary>
public sealed class Transformer : nn.Module<Tensor, Tensor?, Tensor>
{
    public ModuleList<ResidualAttentionBlock> resblocks;

    public int Width { get; }

    public Transformer(int width, int layers, int heads, double mlpRatio, double? lsInitValue, bool quickGelu)
        : base(nameof(Transformer))
    {
        Width = width;
        resblocks = new ModuleList<ResidualAttentionBlock>();
        for (int i = 0; i < layers; i++) resblocks.Add(new ResidualAttentionBlock(width, heads, mlpRatio, lsInitValue, quickGelu));
        RegisterComponents();
    }

    /// <param name="x">[N, L, width] (batch-first)</param>
    public override Tensor forward(Tensor x, Tensor? attnMask)
    {
        using var scope = NewDisposeScope();
        foreach (var block in resblocks) x = block.forward(x, attnMask);
        return x.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// open_clip <c>VisionTransformer</c> (transformer.py, v2.16.0): patchify with <c>conv1</c> (no bias),
/// prepend <c>class_embedding</c>, add <c>positional_embedding</c>, <c>ln_pre</c>, transformer,
/// pool the class token (or the token mean with global_average_pool), <c>ln_post</c>, <c>@ proj</c>.
/// </summary>
public sealed class VisionTransformer : nn.Module<Tensor, Tensor>
{
    private readonly bool _globalAveragePool;

    public Conv2d conv1;
    public Parameter class_embedding;
    public Parameter positional_embedding;
    public LayerNorm ln_pre;
    public Transformer transformer;
    public LayerNorm ln_post;
    public Parameter proj;

    public int ImageHeight { get; }
    public int ImageWidth { get; }

    public VisionTransformer(OpenClipVisionConfig cfg, int outputDim, bool quickGelu) : base(nameof(VisionTransformer))
    {
        ImageHeight = cfg.ImageHeight;
        ImageWidth = cfg.ImageWidth;
        _globalAveragePool = cfg.GlobalAveragePool;
        long grid = (long)(cfg.ImageHeight / cfg.PatchSize) * (cfg.ImageWidth / cfg.PatchSize);
        double scale = Math.Pow(cfg.Width, -0.5);
        conv1 = nn.Conv2d(3, cfg.Width, cfg.PatchSize, stride: cfg.PatchSize, bias: false);
        class_embedding = new Parameter(torch.randn(cfg.Width) * scale);
        positional_embedding = new Parameter(torch.randn(grid + 1, cfg.Width) * scale);
        ln_pre = nn.LayerNorm(cfg.Width);
        transformer = new Transformer(cfg.Width, cfg.Layers, cfg.Heads, cfg.MlpRatio, cfg.LsInitValue, quickGelu);
        ln_post = nn.LayerNorm(cfg.Width);
        proj = new Parameter(torch.randn(cfg.Width, outputDim) * scale);
        RegisterComponents();
    }

    /// <param name="x">[N, 3, H, W] normalised pixels</param>
    /// <returns>[N, embed_dim] image features (not normalised)</returns>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        if (x.dim() != 4 || x.shape[1] != 3 || x.shape[2] != ImageHeight || x.shape[3] != ImageWidth)
            throw new ArgumentException($"open_clip image tower expects [N, 3, {ImageHeight}, {ImageWidth}], got [{string.Join(",", x.shape)}]");
        x = conv1.forward(x);
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1);
        var cls = class_embedding.to(x.dtype).expand(x.shape[0], 1, x.shape[2]);
        x = torch.cat([cls, x], 1);
        x = x + positional_embedding.to(x.dtype);
        x = ln_pre.forward(x);
        x = transformer.forward(x, null);
        var pooled = _globalAveragePool ? x.mean([1]) : x[.., 0];
        pooled = ln_post.forward(pooled);
        return torch.matmul(pooled, proj).MoveToOuterDisposeScope();
    }
}
