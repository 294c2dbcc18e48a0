using TorchSharp;
using static TorchSharp.torch;
using GeluApproximate = TorchSharp.Modules.GELU.Approximate;

namespace RealAlign.Core.Models;

/// <summary>Activation helpers of diffusers <c>models/activations.py</c>.</summary>
public static class Activations
{
    /// <summary>diffusers <c>get_activation</c>: parameter-free activations by their config name.</summary>
    public static nn.Module<Tensor, Tensor> get_activation(string act_fn) => act_fn switch
    {
        "swish" or "silu" => nn.SiLU(),
        "mish" => nn.Mish(),
        "gelu" => nn.GELU(),
        "gelu_tanh" => nn.GELU(GeluApproximate.tanh),
        "relu" => nn.ReLU(),
        _ => throw new ArgumentException($"unsupported activation function '{act_fn}'", nameof(act_fn)),
    };

    public static GeluApproximate ParseGeluApproximate(string approximate) => approximate switch
    {
        "none" => GeluApproximate.none,
        "tanh" => GeluApproximate.tanh,
        _ => throw new ArgumentException($"GELU approximate must be 'none' or 'tanh', got '{approximate}'", nameof(approximate)),
    };
}

/// <summary>diffusers <c>GELU</c>: a projection followed by GELU (optionally tanh-approximated).</summary>
public sealed class GELU : nn.Module<Tensor, Tensor>
{
    public LoRACompatibleLinear proj;
    private readonly GeluApproximate _approximate;

    public GELU(long dim_in, long dim_out, string approximate = "none", bool bias = true) : base(nameof(GELU))
    {
        proj = new LoRACompatibleLinear(dim_in, dim_out, bias);
        _approximate = Activations.ParseGeluApproximate(approximate);
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states)
    {
        using var h = proj.forward(hidden_states);
        return nn.functional.gelu(h, _approximate);
    }
}

/// <summary>diffusers <c>GEGLU</c>: projection to twice the width, then <c>hidden * gelu(gate)</c> (arXiv:2002.05202).</summary>
public sealed class GEGLU : nn.Module<Tensor, Tensor>
{
    public LoRACompatibleLinear proj;

    public GEGLU(long dim_in, long dim_out, bool bias = true) : base(nameof(GEGLU))
    {
        proj = new LoRACompatibleLinear(dim_in, dim_out * 2, bias);
        RegisterComponents();
    }

    public override Tensor forward(Tensor hidden_states)
    {
        using var scope = NewDisposeScope();
        var chunks = proj.forward(hidden_states).chunk(2, dim: -1);
        return (chunks[0] * nn.functional.gelu(chunks[1])).MoveToOuterDisposeScope();
    }
}
