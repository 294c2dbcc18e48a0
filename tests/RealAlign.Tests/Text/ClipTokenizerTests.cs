using System.Text.Json.Nodes;
using RealAlign.Core.Text;
using RealAlign.Tests.Infrastructure;
using static TorchSharp.torch;

namespace RealAlign.Tests.Text;

/// <summary>
/// Golden ids from transformers' slow CLIPTokenizer without ftfy, in SD3's two conventions
/// (tokenizer: pad &lt;|endoftext|&gt;; tokenizer_2: pad "!"). The ftfy goldens
/// (input_ids_tokenizer_ftfy, input_ids_tokenizer_2_ftfy) and openai_clip_tokenize_77 are not
/// checked: ClipTokenizer implements the no-ftfy path that a default diffusers install runs.
/// </summary>
public class ClipTokenizerTests
{
    private const string CaseName = "clip_tokenizer";

    private static (GoldenCase c, List<JsonObject> prompts) Load()
    {
        var c = Fixtures.Case(CaseName);
        var file = c.Json["prompts_file"]!.GetValue<string>().Split(' ')[0];
        var prompts = JsonNode.Parse(File.ReadAllText(c.PathOf(file)))!.AsArray().Select(n => n!.AsObject()).ToList();
        return (c, prompts);
    }

    public static IEnumerable<object[]> Conventions() =>
    [
        ["tokenizer", "input_ids_tokenizer", "attention_mask_tokenizer"],
        ["tokenizer_2", "input_ids_tokenizer_2", "attention_mask_tokenizer_2"],
    ];

    [Theory]
    [MemberData(nameof(Conventions))]
    public void MatchesTransformersWithoutFtfy(string folder, string idsName, string maskName)
    {
        var (c, prompts) = Load();
        using var _c = c;
        var tok = ClipTokenizer.FromFolder(c.PathOf(folder));
        using var expIds = c.Out(idsName);
        using var expMask = c.Out(maskName);
        int maxLength = (int)expIds.shape[1];
        var failures = new List<string>();
        for (int i = 0; i < prompts.Count; i++)
        {
            var prompt = prompts[i]["prompt"]!.GetValue<string>();
            var (ids, mask) = tok.Encode(prompt, maxLength);
            var want = expIds[i].data<long>().ToArray();
            var wantMask = expMask[i].data<long>().ToArray();
            if (!ids.SequenceEqual(want) || !mask.SequenceEqual(wantMask))
                failures.Add($"#{i} {prompt}\n  got  {string.Join(",", ids)}\n  want {string.Join(",", want)}");
        }
        Assert.True(failures.Count == 0, $"{failures.Count} prompt(s) differ:\n" + string.Join("\n", failures));
    }

    [Fact]
    public void TokensAndIdsWithoutSpecialTokensMatchPromptsJson()
    {
        var (c, prompts) = Load();
        using var _c = c;
        var tok = ClipTokenizer.FromFolder(c.PathOf("tokenizer"));
        foreach (var p in prompts)
        {
            var prompt = p["prompt"]!.GetValue<string>();
            var wantTokens = p["tokens"]!.AsArray().Select(t => t!.GetValue<string>()).ToList();
            var wantIds = p["ids_no_special"]!.AsArray().Select(t => t!.GetValue<int>()).ToList();
            Assert.Equal(wantTokens, tok.Tokenize(prompt));
            Assert.Equal(wantIds, tok.EncodeWithoutSpecialTokens(prompt));
        }
    }

    [Fact]
    public void SpecialTokenIdsComeFromTheFolders()
    {
        var (c, _) = Load();
        using var _c = c;
        var t1 = ClipTokenizer.FromFolder(c.PathOf("tokenizer"));
        var t2 = ClipTokenizer.FromFolder(c.PathOf("tokenizer_2"));
        Assert.Equal((49406, 49407, 49407), (t1.BosTokenId, t1.EosTokenId, t1.PadTokenId));
        Assert.Equal((49406, 49407, 0), (t2.BosTokenId, t2.EosTokenId, t2.PadTokenId));
    }

    [Theory]
    [InlineData("tokenizer", false)]
    [InlineData("tokenizer_2", true)]
    public void EmbeddedVocabularyEqualsTheFolder(string folder, bool padWithExclamation)
    {
        var (c, prompts) = Load();
        using var _c = c;
        var fromFolder = ClipTokenizer.FromFolder(c.PathOf(folder));
        var embedded = ClipTokenizer.Embedded(padWithExclamation);
        Assert.Equal(fromFolder.PadTokenId, embedded.PadTokenId);
        Assert.Equal(fromFolder.VocabSize, embedded.VocabSize);
        foreach (var p in prompts)
        {
            var prompt = p["prompt"]!.GetValue<string>();
            Assert.Equal(fromFolder.Encode(prompt).ids, embedded.Encode(prompt).ids);
        }
    }

    [Fact]
    public void EncodeBatchStacksRowsAsTensors()
    {
        var (c, prompts) = Load();
        using var _c = c;
        using var scope = NewDisposeScope();
        var tok = ClipTokenizer.FromFolder(c.PathOf("tokenizer_2"));
        var texts = prompts.Select(p => p["prompt"]!.GetValue<string>()).ToList();
        var (ids, mask) = tok.EncodeBatch(texts);
        Assert.Equal(ScalarType.Int64, ids.dtype);
        c.AssertClose("input_ids_tokenizer_2", ids);
        c.AssertClose("attention_mask_tokenizer_2", mask);
    }

    [Fact]
    public void TruncationKeepsBosFirstTokensAndEos()
    {
        var (c, prompts) = Load();
        using var _c = c;
        var tok = ClipTokenizer.FromFolder(c.PathOf("tokenizer"));
        var longPrompt = prompts.First(p => p["truncated"]!.GetValue<bool>());
        var prompt = longPrompt["prompt"]!.GetValue<string>();
        var all = longPrompt["ids_no_special"]!.AsArray().Select(t => (long)t!.GetValue<int>()).ToArray();

        var (ids, mask) = tok.Encode(prompt, maxLength: 77);
        Assert.Equal(77, ids.Length);
        Assert.Equal([tok.BosTokenId, .. all.Take(75), tok.EosTokenId], ids);
        Assert.All(mask, m => Assert.Equal(1L, m));

        var (full, fullMask) = tok.Encode(prompt, maxLength: 77, padToMax: false, truncate: false);
        Assert.Equal(all.Length + 2, full.Length);
        Assert.Equal(full.Length, fullMask.Length);

        var (shortIds, shortMask) = tok.Encode(prompts[0]["prompt"]!.GetValue<string>(), padToMax: false);
        Assert.Equal(prompts[0]["num_tokens_with_special"]!.GetValue<int>(), shortIds.Length);
        Assert.All(shortMask, m => Assert.Equal(1L, m));
    }
}
