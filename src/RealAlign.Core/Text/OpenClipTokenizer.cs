using System.Net;
using System.Text.RegularExpressions;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Text;

/// <summary>
/// open_clip 2.16's <c>tokenize</c> (src/open_clip/tokenizer.py) on top of <see cref="ClipTokenizer"/>'s
/// BPE: text → <c>basic_clean</c> (html.unescape twice, strip) → <c>whitespace_clean</c> → lower →
/// BPE; ids = <c>[sot] + tokens + [eot]</c>, cut to <c>context_length</c> with the last id set to eot,
/// zero-padded.
/// </summary>
/// <remarks>
/// Gap: upstream's <c>basic_clean</c> starts with <c>ftfy.fix_text</c> (mojibake repair, NFC,
/// curly-quote/ligature fixes), which has no .NET port here; plain text (ASCII, already-NFC Unicode)
/// tokenizes identically, mojibake or ligatures may not. hps_e2e's <c>out.text</c> is the golden.
/// </remarks>
public sealed class OpenClipTokenizer(ClipTokenizer bpe, int contextLength = 77)
{
    private static readonly Regex Whitespace = new(@"\s+", RegexOptions.CultureInvariant);

    public int ContextLength { get; } = contextLength;
    public int SotTokenId => bpe.BosTokenId;
    public int EotTokenId => bpe.EosTokenId;

    /// <summary>
    /// An open_clip folder's tokenizer: its <c>bpe_simple_vocab_16e6.txt.gz</c> when present, else
    /// the CLIP vocabulary embedded in RealAlign.Core (the same file's merges).
    /// </summary>
    public static OpenClipTokenizer FromFolder(string folder, int contextLength = 77)
    {
        var gz = Path.Combine(folder, "bpe_simple_vocab_16e6.txt.gz");
        return new OpenClipTokenizer(File.Exists(gz) ? ClipTokenizer.FromOpenAiBpe(gz) : ClipTokenizer.Embedded(), contextLength);
    }

    /// <summary>upstream basic_clean (minus ftfy) + whitespace_clean + lower().</summary>
    public static string Clean(string text)
    {
        text = WebUtility.HtmlDecode(WebUtility.HtmlDecode(text)).Trim();
        text = Whitespace.Replace(text, " ").Trim();
        return ClipTokenizer.PythonLower(text);
    }

    /// <summary>Token ids [context_length] for one text.</summary>
    public long[] Encode(string text)
    {
        var body = bpe.EncodeWithoutSpecialTokens(Clean(text));
        var ids = new long[ContextLength];
        var tokens = new List<long>(body.Count + 2) { SotTokenId };
        tokens.AddRange(body.Select(i => (long)i));
        tokens.Add(EotTokenId);
        if (tokens.Count > ContextLength)
        {
            tokens = tokens.Take(ContextLength).ToList();
            tokens[^1] = EotTokenId;
        }
        for (var i = 0; i < tokens.Count; i++) ids[i] = tokens[i];
        return ids;
    }

    /// <summary>Token ids [N, context_length] int64 on the CPU.</summary>
    public Tensor EncodeBatch(IReadOnlyList<string> texts)
    {
        var ids = new long[texts.Count * ContextLength];
        for (var b = 0; b < texts.Count; b++) Array.Copy(Encode(texts[b]), 0, ids, b * ContextLength, ContextLength);
        return torch.tensor(ids, new long[] { texts.Count, ContextLength }, ScalarType.Int64);
    }
}
