using RealAlign.Core.Rewards;
using RealAlign.Core.Text;
using RealAlign.Tests.Infrastructure;
using static TorchSharp.torch;

namespace RealAlign.Tests.Rewards;

public class RewardScorerTests
{
    /// <summary>open_clip's tokenize on the hps_e2e prompts (html entities, a truncated long prompt) equals out.text.</summary>
    [Fact]
    public void OpenClipTokenizerMatchesHpsCaseTokenIds()
    {
        using var c = Fixtures.Case("hps_e2e");
        var tokenizer = OpenClipTokenizer.FromFolder(c.PathOf(c.Json["reward_dir"]!.GetValue<string>()));
        var prompts = c.Json["prompts"]!.AsArray().Select(p => p!.GetValue<string>()).ToList();
        c.AssertClose("text", tokenizer.EncodeBatch(prompts));
    }

    /// <summary>The gz merges file gives transformers' vocab.json ids.</summary>
    [Fact]
    public void OpenAiBpeFileGivesTheSameIdsAsVocabJson()
    {
        using var c = Fixtures.Case("hps_e2e");
        var fromGz = ClipTokenizer.FromOpenAiBpe(c.PathOf("reward", "bpe_simple_vocab_16e6.txt.gz"));
        var embedded = ClipTokenizer.Embedded();
        Assert.Equal(embedded.VocabSize, fromGz.VocabSize);
        const string text = "Aerial view of farmland with a red roof, highly detailed, 8k — naïve café";
        Assert.Equal(embedded.Encode(text).ids, fromGz.Encode(text).ids);
    }

    /// <summary>Embedded tiny CLIP: batching and prompt dedup do not change scores; sgp = PickScore difference.</summary>
    [Fact]
    public void TinyScorersAreConsistentAcrossBatching()
    {
        using var registry = RewardRegistry.Load([], CPU);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var gen = new TorchSharp.torch.Generator(5);
        var images = Enumerable.Range(0, 4).Select(i => randint(0, 256, [20 + i * 7, 33, 3], generator: gen).to(ScalarType.Byte)).ToList();
        string[] prompts = ["a red house", "a cat", "a red house", "a long prompt about hills"];
        var pick = registry.Get("pickscore");
        var batched = pick.Score(images, prompts).Select(d => d["pickscore"]).ToArray();
        var single = images.Select((img, i) => pick.Score([img], [prompts[i]])[0]["pickscore"]).ToArray();
        Assert.Equal(single, batched, (a, b) => Math.Abs(a - b) < 1e-4);

        var sgp = registry.Get("sgp_pickscore").Score(images, prompts).Select(d => d["sgp_pickscore"]).ToArray();
        var real = pick.Score(images, prompts.Select(p => SgpPickScoreScorer.RealisticPrefix + p).ToList());
        var cg = pick.Score(images, prompts.Select(p => SgpPickScoreScorer.CgPrefix + p).ToList());
        for (var i = 0; i < 4; i++) Assert.Equal(real[i]["pickscore"] - cg[i]["pickscore"], sgp[i], 4);

        Assert.Throws<RewardNotFoundException>(() => registry.Get("hps"));
    }
}
