using System.Globalization;
using System.Reflection;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.ML.Tokenizers;
using TorchSharp;
using static TorchSharp.torch;

namespace RealAlign.Core.Text;

/// <summary>
/// CLIP's byte-level BPE tokenizer, reproducing transformers' slow <c>CLIPTokenizer</c> as a default
/// diffusers install runs it, i.e. without ftfy (transformers
/// src/transformers/models/clip/tokenization_clip.py). The steps, in upstream order:
/// <list type="number">
/// <item>split the prompt on added tokens (<c>PreTrainedTokenizer.tokenize</c>'s trie: bos/eos/unk/pad and
/// <c>added_tokens_decoder</c>; SD3's tokenizer_2 has "!" there, so "!" always becomes id 0);</item>
/// <item>each remaining piece goes through <c>BasicTokenizer(strip_accents=False, do_split_on_punc=False)</c>:
/// drop control/format characters, whitespace → space, spaces around CJK ideographs, NFC, split on
/// whitespace, lower-case each word, re-join with single spaces;</item>
/// <item>CLIP's pre-tokenization regex
/// <c>&lt;\|startoftext\|&gt;|&lt;\|endoftext\|&gt;|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+</c>;</item>
/// <item>UTF-8 bytes mapped through GPT-2's <c>bytes_to_unicode</c>, then BPE with the <c>&lt;/w&gt;</c>
/// end-of-word suffix (Microsoft.ML.Tokenizers' <see cref="BpeTokenizer"/>).</item>
/// </list>
/// Steps 1–3 are done here rather than with ML.Tokenizers' normalizer/pre-tokenizer because those
/// work on UTF-16 code units with .NET regex semantics, whereas upstream works on code points.
/// </summary>
public sealed class ClipTokenizer
{
    /// <summary>Merges upstream reads: <c>merges.txt</c> lines [1, 49152 - 256 - 2 + 1).</summary>
    private const int MaxMerges = 49152 - 256 - 2;
    private const string StartOfText = "<|startoftext|>";
    private const string EndOfText = "<|endoftext|>";

    private readonly BpeTokenizer _bpe;
    private readonly Dictionary<string, int> _vocab;
    /// <summary>Tokens the text is split on before BPE (content → id), longest first.</summary>
    private readonly KeyValuePair<string, int>[] _addedTokens;
    private readonly string[] _byteEncoder = BytesToUnicode();

    public int BosTokenId { get; }
    public int EosTokenId { get; }
    public int PadTokenId { get; }
    public int UnkTokenId { get; }
    public string PadToken { get; }
    public int ModelMaxLength { get; }
    public int VocabSize => _vocab.Count;

    private ClipTokenizer(Dictionary<string, int> vocab, IEnumerable<string> merges, string bos, string eos,
        string unk, string pad, IReadOnlyDictionary<string, int> addedTokens, int modelMaxLength)
    {
        _vocab = vocab;
        _bpe = BpeTokenizer.Create(new BpeOptions(vocab)
        {
            Merges = merges,
            EndOfWordSuffix = "</w>",
            UnknownToken = unk,
        });
        int Id(string token, string role) =>
            addedTokens.TryGetValue(token, out var id) ? id
            : vocab.TryGetValue(token, out id) ? id
            : throw new InvalidDataException($"CLIP tokenizer: {role} token '{token}' is neither in vocab.json nor an added token");
        BosTokenId = Id(bos, "bos");
        EosTokenId = Id(eos, "eos");
        UnkTokenId = Id(unk, "unk");
        PadTokenId = Id(pad, "pad");
        PadToken = pad;
        ModelMaxLength = modelMaxLength;

        // transformers registers the special tokens as added tokens too, so they split the text.
        var added = new Dictionary<string, int>(addedTokens, StringComparer.Ordinal)
        {
            [bos] = BosTokenId, [eos] = EosTokenId, [unk] = UnkTokenId, [pad] = PadTokenId,
        };
        _addedTokens = added.OrderByDescending(kv => kv.Key.Length).ToArray();
    }

    /// <summary>
    /// Loads a transformers tokenizer folder: vocab.json, merges.txt and, when present,
    /// tokenizer_config.json / special_tokens_map.json (bos/eos/unk/pad, added tokens, model_max_length).
    /// </summary>
    public static ClipTokenizer FromFolder(string dir)
    {
        var vocabPath = Path.Combine(dir, "vocab.json");
        var mergesPath = Path.Combine(dir, "merges.txt");
        if (!File.Exists(vocabPath) || !File.Exists(mergesPath))
            throw new FileNotFoundException($"CLIP tokenizer folder '{dir}' needs vocab.json and merges.txt");
        using var vocabStream = File.OpenRead(vocabPath);
        using var mergesStream = File.OpenRead(mergesPath);
        var config = ReadJson(Path.Combine(dir, "tokenizer_config.json"));
        var specialMap = ReadJson(Path.Combine(dir, "special_tokens_map.json"));
        return Create(vocabStream, mergesStream, config, specialMap);
    }

    /// <summary>
    /// The openai CLIP vocabulary shipped inside RealAlign.Core, in SD3's two conventions:
    /// <c>tokenizer</c> pads with &lt;|endoftext|&gt; (49407); <c>tokenizer_2</c>
    /// (<paramref name="padWithExclamation"/>) pads with "!" (id 0), which is then also an added token.
    /// </summary>
    public static ClipTokenizer Embedded(bool padWithExclamation = false)
    {
        var asm = typeof(ClipTokenizer).Assembly;
        using var vocab = OpenResource(asm, "RealAlign.Core.Resources.clip.vocab.json");
        using var merges = OpenResource(asm, "RealAlign.Core.Resources.clip.merges.txt");
        var config = new JsonObject { ["model_max_length"] = 77 };
        if (padWithExclamation)
        {
            config["pad_token"] = "!";
            config["added_tokens_decoder"] = new JsonObject { ["0"] = new JsonObject { ["content"] = "!" } };
        }
        return Create(vocab, merges, config, null);
    }

    /// <summary>
    /// Builds the tokenizer from openai CLIP's / open_clip's <c>bpe_simple_vocab_16e6.txt(.gz)</c>, which holds
    /// only the merges: the vocabulary is derived as <c>SimpleTokenizer.__init__</c> does (the 256 byte
    /// symbols in <c>bytes_to_unicode</c> order, the same with <c>&lt;/w&gt;</c>, one entry per merge,
    /// then start/end of text), which gives the same ids as transformers' vocab.json (49406 / 49407).
    /// </summary>
    public static ClipTokenizer FromOpenAiBpe(string path)
    {
        using var file = File.OpenRead(path);
        using Stream text = path.EndsWith(".gz", StringComparison.OrdinalIgnoreCase)
            ? new System.IO.Compression.GZipStream(file, System.IO.Compression.CompressionMode.Decompress)
            : file;
        var merges = ReadMerges(text);
        var byteEncoder = BytesToUnicode();
        var order = Enumerable.Range(0, 256).Where(IsPrintableByte).Concat(Enumerable.Range(0, 256).Where(b => !IsPrintableByte(b)));
        var symbols = order.Select(b => byteEncoder[b]).ToList();
        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var v in symbols.Concat(symbols.Select(v => v + "</w>")).Concat(merges.Select(m => m.Replace(" ", ""))))
            vocab[v] = vocab.Count;
        vocab[StartOfText] = vocab.Count;
        vocab[EndOfText] = vocab.Count;
        return new ClipTokenizer(vocab, merges, StartOfText, EndOfText, EndOfText, EndOfText, new Dictionary<string, int>(), 77);
    }

    private static Stream OpenResource(Assembly asm, string name) =>
        asm.GetManifestResourceStream(name) ?? throw new InvalidOperationException($"embedded resource '{name}' is missing from {asm.GetName().Name}");

    private static JsonObject? ReadJson(string path) =>
        File.Exists(path) ? JsonNode.Parse(File.ReadAllText(path))?.AsObject() : null;

    private static ClipTokenizer Create(Stream vocabStream, Stream mergesStream, JsonObject? config, JsonObject? specialMap)
    {
        var vocab = JsonSerializer.Deserialize<Dictionary<string, int>>(vocabStream)
                    ?? throw new InvalidDataException("vocab.json is empty");
        var merges = ReadMerges(mergesStream);

        // special_tokens_map.json wins over tokenizer_config.json, as in transformers' from_pretrained;
        // an entry is either a string or an AddedToken object with "content".
        string Special(string key, string fallback) =>
            TokenContent(specialMap?[key]) ?? TokenContent(config?[key]) ?? fallback;
        string bos = Special("bos_token", StartOfText);
        string eos = Special("eos_token", EndOfText);
        string unk = Special("unk_token", EndOfText);
        string pad = Special("pad_token", EndOfText);

        var added = new Dictionary<string, int>(StringComparer.Ordinal);
        if (config?["added_tokens_decoder"] is JsonObject decoder)
            foreach (var (idText, node) in decoder)
                if (TokenContent(node) is { } content)
                    added[content] = int.Parse(idText, CultureInfo.InvariantCulture);

        int maxLen = 77;
        if (config?["model_max_length"] is JsonValue v && v.TryGetValue<double>(out var m) && m is > 0 and < int.MaxValue)
            maxLen = (int)m;
        return new ClipTokenizer(vocab, merges, bos, eos, unk, pad, added, maxLen);
    }

    private static string? TokenContent(JsonNode? node) => node switch
    {
        JsonValue s when s.TryGetValue<string>(out var str) => str,
        JsonObject o => o["content"]?.GetValue<string>(),
        _ => null,
    };

    private static List<string> ReadMerges(Stream stream)
    {
        using var reader = new StreamReader(stream, Encoding.UTF8);
        // Upstream: read().strip().split("\n")[1 : 49152 - 256 - 2 + 1] (line 0 is "#version: 0.2").
        var lines = reader.ReadToEnd().Trim().Split('\n');
        return lines.Skip(1).Take(MaxMerges).Select(l => l.TrimEnd('\r')).ToList();
    }

    // ---------------------------------------------------------------- encoding

    /// <summary>
    /// Token ids with bos/eos, as <c>tokenizer(text, padding="max_length", max_length, truncation=True)</c>:
    /// truncation keeps bos + the first <c>maxLength - 2</c> tokens + eos; padding appends
    /// <see cref="PadTokenId"/> with mask 0.
    /// </summary>
    public (long[] ids, long[] mask) Encode(string text, int maxLength = 77, bool padToMax = true, bool truncate = true)
    {
        if (maxLength < 2) throw new ArgumentOutOfRangeException(nameof(maxLength), maxLength, "must leave room for bos and eos");
        var body = EncodeWithoutSpecialTokens(text);
        int keep = truncate ? Math.Min(body.Count, maxLength - 2) : body.Count;
        int length = keep + 2;
        int total = padToMax ? Math.Max(length, maxLength) : length;
        var ids = new long[total];
        var mask = new long[total];
        ids[0] = BosTokenId;
        for (int i = 0; i < keep; i++) ids[i + 1] = body[i];
        ids[keep + 1] = EosTokenId;
        for (int i = 0; i < total; i++)
        {
            bool real = i < length;
            mask[i] = real ? 1 : 0;
            if (!real) ids[i] = PadTokenId;
        }
        return (ids, mask);
    }

    /// <summary>Encodes a batch padded/truncated to <paramref name="maxLength"/>: ids and attention mask, [B, maxLength] int64 on the CPU.</summary>
    public (Tensor ids, Tensor mask) EncodeBatch(IReadOnlyList<string> texts, int maxLength = 77)
    {
        var ids = new long[texts.Count * maxLength];
        var mask = new long[texts.Count * maxLength];
        for (int b = 0; b < texts.Count; b++)
        {
            var (i, m) = Encode(texts[b], maxLength, padToMax: true, truncate: true);
            Array.Copy(i, 0, ids, b * maxLength, maxLength);
            Array.Copy(m, 0, mask, b * maxLength, maxLength);
        }
        long[] shape = [texts.Count, maxLength];
        return (torch.tensor(ids, shape, ScalarType.Int64), torch.tensor(mask, shape, ScalarType.Int64));
    }

    /// <summary>Ids without bos/eos and without truncation (<c>add_special_tokens=False</c>).</summary>
    public List<int> EncodeWithoutSpecialTokens(string text)
    {
        var ids = new List<int>();
        foreach (var (token, addedId) in TokenizeCore(text))
            ids.Add(addedId ?? (_vocab.TryGetValue(token, out var id) ? id : UnkTokenId));
        return ids;
    }

    /// <summary>The BPE tokens of <paramref name="text"/> (e.g. "a&lt;/w&gt;", "photo&lt;/w&gt;"), as transformers' <c>tokenize()</c>.</summary>
    public IReadOnlyList<string> Tokenize(string text) => TokenizeCore(text).Select(t => t.token).ToList();

    /// <summary>Tokens, each with its id when it is an added token (which bypasses the vocabulary lookup).</summary>
    private IEnumerable<(string token, int? addedId)> TokenizeCore(string text)
    {
        foreach (var (piece, addedId) in SplitOnAddedTokens(text))
        {
            if (addedId is { } id)
            {
                yield return (piece, id);
                continue;
            }
            foreach (var word in PreTokenize(BasicClean(piece)))
            {
                // BPE's cache maps the two special words to themselves, whatever the merges say.
                if (word is StartOfText or EndOfText)
                {
                    yield return (word, null);
                    continue;
                }
                var mapped = new StringBuilder(word.Length * 2);
                foreach (var b in Encoding.UTF8.GetBytes(word)) mapped.Append(_byteEncoder[b]);
                foreach (var t in _bpe.EncodeToTokens(mapped.ToString(), out _, considerPreTokenization: false, considerNormalization: false))
                    yield return (t.Value, null);
            }
        }
    }

    /// <summary>Splits on added tokens, leftmost then longest match, like transformers' <c>Trie.split</c>.</summary>
    private IEnumerable<(string piece, int? addedId)> SplitOnAddedTokens(string text)
    {
        int start = 0, i = 0;
        while (i < text.Length)
        {
            KeyValuePair<string, int>? hit = null;
            foreach (var kv in _addedTokens)
                if (i + kv.Key.Length <= text.Length && string.CompareOrdinal(text, i, kv.Key, 0, kv.Key.Length) == 0)
                {
                    hit = kv;
                    break;
                }
            if (hit is not { } h) { i++; continue; }
            if (i > start) yield return (text[start..i], null);
            yield return (h.Key, h.Value);
            i += h.Key.Length;
            start = i;
        }
        if (start < text.Length) yield return (text[start..], null);
    }

    // ---------------------------------------------------------------- BasicTokenizer (no ftfy)

    /// <summary>
    /// transformers' <c>BasicTokenizer(do_lower_case=True, strip_accents=False, do_split_on_punc=False).tokenize</c>
    /// joined by spaces: per code point, drop U+0000, U+FFFD and category C (except \t\n\r); whitespace
    /// (\t\n\r, Zs) → ' '; pad CJK ideographs with spaces; NFC; split on whitespace; Python <c>str.lower()</c>.
    /// </summary>
    public static string BasicClean(string text)
    {
        var sb = new StringBuilder(text.Length + 8);
        for (int i = 0; i < text.Length;)
        {
            if (Rune.DecodeFromUtf16(text.AsSpan(i), out var r, out int used) != System.Buffers.OperationStatus.Done)
            {
                i += Math.Max(used, 1); // a lone surrogate is category Cs: dropped
                continue;
            }
            i += used;
            int cp = r.Value;
            if (cp is '\t' or '\n' or '\r' or ' ' || Rune.GetUnicodeCategory(r) == UnicodeCategory.SpaceSeparator)
                sb.Append(' ');
            else if (cp == 0 || cp == 0xFFFD || IsOtherCategory(Rune.GetUnicodeCategory(r)))
                continue;
            else if (IsChineseChar(cp))
                sb.Append(' ').Append(r.ToString()).Append(' ');
            else
                sb.Append(r.ToString());
        }
        var normalized = sb.ToString().Normalize(NormalizationForm.FormC);
        var words = SplitOnWhitespace(normalized).Select(PythonLower);
        return string.Join(' ', words);
    }

    private static bool IsOtherCategory(UnicodeCategory c) => c is UnicodeCategory.Control or UnicodeCategory.Format
        or UnicodeCategory.Surrogate or UnicodeCategory.PrivateUse or UnicodeCategory.OtherNotAssigned;

    /// <summary>BasicTokenizer._is_chinese_char: the CJK Unified Ideographs blocks (not kana or hangul).</summary>
    private static bool IsChineseChar(int cp) =>
        cp is (>= 0x4E00 and <= 0x9FFF) or (>= 0x3400 and <= 0x4DBF) or (>= 0x20000 and <= 0x2A6DF)
            or (>= 0x2A700 and <= 0x2B73F) or (>= 0x2B740 and <= 0x2B81F) or (>= 0x2B820 and <= 0x2CEAF)
            or (>= 0xF900 and <= 0xFAFF) or (>= 0x2F800 and <= 0x2FA1F);

    /// <summary>Python <c>str.split()</c> with no argument (any Unicode whitespace, empty parts dropped).</summary>
    private static IEnumerable<string> SplitOnWhitespace(string s)
    {
        int start = -1;
        for (int i = 0; i < s.Length; i++)
        {
            bool ws = char.IsWhiteSpace(s[i]) || s[i] is >= '\x1c' and <= '\x1f';
            if (ws && start >= 0) { yield return s[start..i]; start = -1; }
            else if (!ws && start < 0) start = i;
        }
        if (start >= 0) yield return s[start..];
    }

    /// <summary>
    /// Python's <c>str.lower()</c>: per-code-point lower-casing, plus the two things it does beyond
    /// simple case mapping: U+0130 → "i̇" (SpecialCasing) and the contextual final sigma (approximating
    /// Unicode's Cased / Case_Ignorable properties by general category).
    /// </summary>
    public static string PythonLower(string s)
    {
        var runes = s.EnumerateRunes().ToArray();
        var sb = new StringBuilder(s.Length);
        for (int i = 0; i < runes.Length; i++)
        {
            var r = runes[i];
            if (r.Value == 0x130) sb.Append("i\u0307");
            else if (r.Value == 0x3A3) sb.Append(IsFinalSigma(runes, i) ? 'ς' : 'σ');
            else sb.Append(Rune.ToLowerInvariant(r).ToString());
        }
        return sb.ToString();
    }

    private static bool IsFinalSigma(Rune[] runes, int at)
    {
        int j = at - 1;
        while (j >= 0 && IsCaseIgnorable(runes[j])) j--;
        if (j < 0 || !IsCased(runes[j])) return false;
        j = at + 1;
        while (j < runes.Length && IsCaseIgnorable(runes[j])) j++;
        return j == runes.Length || !IsCased(runes[j]);
    }

    private static bool IsCased(Rune r) => Rune.GetUnicodeCategory(r) is UnicodeCategory.UppercaseLetter
        or UnicodeCategory.LowercaseLetter or UnicodeCategory.TitlecaseLetter;

    private static bool IsCaseIgnorable(Rune r) =>
        Rune.GetUnicodeCategory(r) is UnicodeCategory.NonSpacingMark or UnicodeCategory.EnclosingMark
            or UnicodeCategory.Format or UnicodeCategory.ModifierLetter or UnicodeCategory.ModifierSymbol
        || r.Value is '\'' or '.' or ':' or 0xB7 or 0x387 or 0x5F4 or 0x2018 or 0x2019 or 0x2024 or 0x2027
            or 0xFE13 or 0xFE52 or 0xFE55 or 0xFF07 or 0xFF0E or 0xFF1A;

    // ---------------------------------------------------------------- CLIP regex

    private static readonly string[] Contractions = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];

    /// <summary>
    /// <c>re.findall</c> of CLIP's pattern (IGNORECASE) over code points: at each position the first
    /// alternative that matches wins; whitespace matches nothing and is skipped.
    /// </summary>
    public static IEnumerable<string> PreTokenize(string text)
    {
        int i = 0;
        while (i < text.Length)
        {
            if (MatchesAt(text, i, StartOfText)) { yield return text.Substring(i, StartOfText.Length); i += StartOfText.Length; continue; }
            if (MatchesAt(text, i, EndOfText)) { yield return text.Substring(i, EndOfText.Length); i += EndOfText.Length; continue; }
            if (text[i] == '\'')
            {
                var c = Contractions.FirstOrDefault(c => MatchesAt(text, i, c));
                if (c is not null) { yield return text.Substring(i, c.Length); i += c.Length; continue; }
            }
            var kind = Classify(text, i, out int len);
            if (kind == CharKind.Space) { i += len; continue; }
            if (kind == CharKind.Number) { yield return text.Substring(i, len); i += len; continue; }
            int start = i;
            i += len;
            while (i < text.Length && Classify(text, i, out int l) == kind) i += l;
            yield return text[start..i];
        }
    }

    private enum CharKind { Letter, Number, Space, Other }

    private static CharKind Classify(string s, int i, out int length)
    {
        if (Rune.DecodeFromUtf16(s.AsSpan(i), out var r, out length) != System.Buffers.OperationStatus.Done)
        {
            length = Math.Max(length, 1);
            return CharKind.Other;
        }
        if (Rune.IsLetter(r)) return CharKind.Letter;
        if (Rune.IsNumber(r)) return CharKind.Number;
        if (Rune.IsWhiteSpace(r)) return CharKind.Space;
        return CharKind.Other;
    }

    /// <summary>Case-insensitive literal match (the pattern is compiled with IGNORECASE; U+017F ſ folds to s).</summary>
    private static bool MatchesAt(string text, int i, string literal)
    {
        if (i + literal.Length > text.Length) return false;
        for (int k = 0; k < literal.Length; k++)
        {
            char a = char.ToLowerInvariant(text[i + k]), b = literal[k];
            if (a != b && !(b == 's' && a == '\u017F')) return false;
        }
        return true;
    }

    /// <summary>GPT-2/CLIP <c>bytes_to_unicode</c>: printable bytes map to themselves, the rest to U+0100 onwards.</summary>
    private static bool IsPrintableByte(int b) => b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;

    private static string[] BytesToUnicode()
    {
        var map = new string[256];
        int n = 0;
        for (int b = 0; b < 256; b++)
        {
            map[b] = ((char)(IsPrintableByte(b) ? b : 256 + n++)).ToString();
        }
        return map;
    }
}
