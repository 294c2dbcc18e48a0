using RealAlign.Core.Rewards;
using RealAlign.Tests.Infrastructure;
using static TorchSharp.torch;

namespace RealAlign.Tests.Rewards;

public class AestheticMlpTests
{
    [Fact]
    public void MatchesImprovedAestheticPredictor()
    {
        using var c = Fixtures.Case("aesthetic_mlp");
        using var mlp = AestheticMlp.FromPretrained(c.PathOf(c.Json["model_dir"]!.GetValue<string>()));
        Assert.Equal(c.Json["input_size"]!.GetValue<int>(), mlp.InputSize);
        var keys = c.Json["state_dict_keys"]!.AsArray().Select(k => k!.GetValue<string>()).ToHashSet();
        Assert.Equal(keys, mlp.state_dict().Keys.ToHashSet());

        using var _ = no_grad();
        using var scope = NewDisposeScope();
        c.AssertClose("scores", mlp.forward(c.In("embeddings")));
        // The upstream numpy `normalized` helper, reproduced, gives the same scores from the raw embeddings.
        c.AssertClose("scores", mlp.forward(AestheticMlp.NormalizeEmbeddings(c.In("raw_embeddings"))));
    }

    [Fact]
    public void NormalizeLeavesZeroRowsUnchanged()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new float[] { 3, 4, 0, 0 }, new long[] { 2, 2 });
        var n = AestheticMlp.NormalizeEmbeddings(x);
        Assert.Equal(new float[] { 0.6f, 0.8f, 0, 0 }, n.data<float>().ToArray());
    }
}
