using static TorchSharp.torch;

namespace RealAlign.Core.Models.Clip;

// transformers' ModelOutput dataclasses for CLIP. HiddenStates is always filled, as with
// output_hidden_states=True: [0] is the encoder input (text: embeddings; vision: after pre_layrnorm),
// [^1] the encoder output before the final norm, [^2] the penultimate layer (what SD3 uses).
// All tensors belong to the caller's dispose scope.

/// <summary>A tower's output: <c>last_hidden_state</c>, <c>pooler_output</c>, <c>hidden_states</c>.</summary>
public sealed record BaseModelOutputWithPooling(Tensor LastHiddenState, Tensor PoolerOutput, IReadOnlyList<Tensor> HiddenStates);

/// <summary><c>CLIPTextModelOutput</c>: <c>text_embeds</c> = text_projection(pooled), last_hidden_state after final_layer_norm.</summary>
public sealed record CLIPTextModelOutput(Tensor TextEmbeds, Tensor LastHiddenState, IReadOnlyList<Tensor> HiddenStates);

/// <summary><c>CLIPVisionModelOutput</c>: <c>image_embeds</c> = visual_projection(post_layernorm(CLS)), last_hidden_state before post_layernorm.</summary>
public sealed record CLIPVisionModelOutput(Tensor ImageEmbeds, Tensor LastHiddenState, IReadOnlyList<Tensor> HiddenStates);

/// <summary>
/// <c>CLIPOutput</c>: <c>logits_per_image</c> [images, texts] = exp(logit_scale) · cos-similarity,
/// <c>logits_per_text</c> its transpose, and the L2-normalised embeddings.
/// </summary>
public sealed record CLIPOutput(
    Tensor LogitsPerImage,
    Tensor LogitsPerText,
    Tensor TextEmbeds,
    Tensor ImageEmbeds,
    BaseModelOutputWithPooling TextModelOutput,
    BaseModelOutputWithPooling VisionModelOutput);

internal static class ClipOutputScopes
{
    /// <summary>Moves each distinct tensor out of the current dispose scope once (outputs share tensors, e.g. a last hidden state).</summary>
    public static void MoveToOuter(IEnumerable<Tensor> tensors)
    {
        var seen = new HashSet<Tensor>(ReferenceEqualityComparer.Instance);
        foreach (var t in tensors)
            if (seen.Add(t)) t.MoveToOuterDisposeScope();
    }

    public static IEnumerable<Tensor> All(this BaseModelOutputWithPooling o) =>
        [o.LastHiddenState, o.PoolerOutput, .. o.HiddenStates];

    public static BaseModelOutputWithPooling MoveToOuter(this BaseModelOutputWithPooling o)
    {
        MoveToOuter(o.All());
        return o;
    }
}
