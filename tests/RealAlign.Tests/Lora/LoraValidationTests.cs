using RealAlign.Core.IO;
using RealAlign.Core.Lora;
using TorchSharp;
using static TorchSharp.torch;
using static RealAlign.Tests.Lora.LoraTestUtil;

namespace RealAlign.Tests.Lora;

public class LoraValidationTests : IDisposable
{
    private readonly Infrastructure.GoldenCase _case = LoraCase();
    private readonly LoraTargetSet _targets;
    private readonly string _dir = TempDir();

    public LoraValidationTests() => _targets = Sd3Targets(_case);

    public void Dispose()
    {
        _case.Dispose();
        Directory.Delete(_dir, true);
    }

    private string FixtureFile => _case.PathOf("lora_diffusers", LoraFormats.DiffusersWeightName);

    /// <summary>The fixture's diffusers tensors, edited by <paramref name="edit"/>, saved as a new file.</summary>
    private string Variant(Action<Dictionary<string, Tensor>> edit, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var tensors = new Dictionary<string, Tensor>();
        using (var st = SafeTensorsFile.Open(FixtureFile))
            foreach (var k in st.Tensors.Keys) tensors[k] = st.Load(k);
        edit(tensors);
        var file = Path.Combine(_dir, Guid.NewGuid().ToString("N") + ".safetensors");
        SafeTensorsFile.Save(file, tensors, metadata);
        return file;
    }

    private LoraFormatException Fails(string path, LoraLoadOptions? options = null) =>
        Assert.Throws<LoraFormatException>(() => LoraFormats.Load(path, _targets, options).Dispose());

    [Fact]
    public void CorruptAndTruncatedFilesAreFormatErrors()
    {
        var bytes = File.ReadAllBytes(FixtureFile);
        var truncated = Path.Combine(_dir, "truncated.safetensors");
        File.WriteAllBytes(truncated, bytes[..(bytes.Length - 64)]);
        Assert.Contains("truncated", Fails(truncated).Message);

        var garbage = Path.Combine(_dir, "garbage.safetensors");
        File.WriteAllBytes(garbage, Enumerable.Range(0, 4096).Select(i => (byte)(i * 7919 % 251)).ToArray());
        Fails(garbage);

        var badJson = (byte[])bytes.Clone();
        badJson[10] = (byte)'}';
        var broken = Path.Combine(_dir, "broken.safetensors");
        File.WriteAllBytes(broken, badJson);
        Fails(broken);

        var empty = Path.Combine(_dir, "empty.safetensors");
        File.WriteAllBytes(empty, []);
        Fails(empty);
    }

    [Fact]
    public void WrongShapesNameTheKeyAndTheExpectedShape()
    {
        const string key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight";
        var file = Variant(t => t[key] = zeros(31, 4));
        var ex = Fails(file);
        Assert.Contains(ex.Problems, p => p.Contains(key) && p.Contains("out_features 32") && p.Contains("[32,4]"));

        const string a = "transformer.transformer_blocks.0.attn.to_k.lora_A.weight";
        ex = Fails(Variant(t => t[a] = zeros(4, 33)));
        Assert.Contains(ex.Problems, p => p.Contains(a) && p.Contains("in_features 32"));
    }

    [Fact]
    public void UnknownKeysAreListed()
    {
        var ex = Fails(Variant(t =>
        {
            t["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = zeros(4, 32);
            t["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = zeros(32, 4);
            t["transformer.transformer_blocks.0.attn.to_q.something"] = zeros(1);
            t["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = zeros(4, 32);
        }));
        Assert.Contains(ex.Problems, p => p.Contains("transformer_blocks.7.attn.to_q") && p.Contains("not linear layers"));
        Assert.Contains(ex.Problems, p => p.Contains("transformer.transformer_blocks.0.attn.to_q.something"));
        Assert.Contains(ex.Problems, p => p.Contains("text_encoder.text_model") && p.Contains("text-encoder"));
    }

    [Fact]
    public void RankProblemsAreReported()
    {
        Assert.Contains(Fails(FixtureFile, new LoraLoadOptions { MaxRank = 2 }).Problems, p => p.Contains("rank 4 exceeds the configured maximum 2"));

        const string path = "transformer_blocks.1.attn.to_v";
        var ex = Fails(Variant(t => t[$"transformer.{path}.lora_B.weight"] = zeros(32, 3)));
        Assert.Contains(ex.Problems, p => p.Contains(path) && p.Contains("rank mismatch"));

        // peft: the weights' rank must be the config's r.
        var peftDir = Path.Combine(_dir, "peft");
        Directory.CreateDirectory(peftDir);
        File.Copy(_case.PathOf("lora_peft", LoraFormats.PeftWeightName), Path.Combine(peftDir, LoraFormats.PeftWeightName));
        File.WriteAllText(Path.Combine(peftDir, LoraFormats.PeftConfigName),
            File.ReadAllText(_case.PathOf("lora_peft", LoraFormats.PeftConfigName)).Replace("\"r\": 4", "\"r\": 8"));
        Assert.Contains(Fails(peftDir).Problems, p => p.Contains("the config says r=8") && p.Contains("r=4"));
    }

    [Fact]
    public void MissingPartnersNonFiniteValuesAndEmptyFilesAreRefused()
    {
        const string path = "transformer_blocks.0.attn.add_q_proj";
        var ex = Fails(Variant(t => t.Remove($"transformer.{path}.lora_A.weight")));
        Assert.Contains(ex.Problems, p => p.Contains(path) && p.Contains("no lora_A"));

        ex = Fails(Variant(t => t[$"transformer.{path}.lora_A.weight"] = full(4, 32, float.NaN)));
        Assert.Contains(ex.Problems, p => p.Contains(path) && p.Contains("NaN"));

        ex = Fails(Variant(t => t.Clear()));
        Assert.Contains(ex.Problems, p => p.Contains("no LoRA weights"));

        ex = Fails(Variant(t => t["transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"] = ones(32)));
        Assert.Contains(ex.Problems, p => p.Contains("DoRA"));
    }

    [Fact]
    public void FiniteCheckFindsNanAndInfAnywhere()
    {
        foreach (var n in new[] { 1, 7, 8, 33, 1001 })
            for (int at = 0; at < n; at += Math.Max(1, n / 5))
                foreach (var bad in new[] { float.NaN, float.PositiveInfinity, float.NegativeInfinity })
                {
                    var t = randn(n);
                    Assert.True(LoraFormats.AllFinite(t));
                    t[at] = bad;
                    Assert.False(LoraFormats.AllFinite(t), $"n={n} at={at} {bad}");
                    Assert.False(LoraFormats.AllFinite(t.to_type(ScalarType.Float16)));
                }
        Assert.True(LoraFormats.AllFinite(full(10, float.MaxValue)));
    }

    [Fact]
    public void PeftWithoutConfigAndPicklesAreRefused()
    {
        var dir = Path.Combine(_dir, "noconfig");
        Directory.CreateDirectory(dir);
        File.Copy(_case.PathOf("lora_peft", LoraFormats.PeftWeightName), Path.Combine(dir, LoraFormats.PeftWeightName));
        Assert.Contains("alpha and r are unknown", Fails(dir).Message);

        var pickle = Path.Combine(_dir, "pickled");
        Directory.CreateDirectory(pickle);
        File.WriteAllBytes(Path.Combine(pickle, "pytorch_lora_weights.bin"), [0x80, 0x02]);
        Assert.Contains("pickle", Fails(pickle).Message);
        Assert.Contains("no such file", Fails(Path.Combine(_dir, "nope")).Message);
        Assert.Contains("declared format", Fails(_case.PathOf("lora_peft"), new LoraLoadOptions { Format = "diffusers" }).Message);
    }

    [Fact]
    public void DiffusersMetadataAlphaIsHonoured()
    {
        // diffusers >= 0.34 pipeline save: component-prefixed LoraConfig JSON under lora_adapter_metadata.
        var file = Variant(_ => { }, new Dictionary<string, string>
        {
            ["format"] = "pt",
            [LoraFormats.DiffusersMetadataKey] = "{\"transformer.lora_alpha\": 2, \"transformer.r\": 4, \"transformer.target_modules\": [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\", \"add_q_proj\", \"add_k_proj\", \"add_v_proj\", \"to_add_out\"]}",
        });
        using var w = LoraFormats.Load(file, _targets);
        Assert.All(w.Modules.Values, m => Assert.Equal(2.0, m.Alpha));
        Assert.Equal(0.5, w.Scaling("transformer_blocks.0.attn.to_q"));

        // Model-level save_lora_adapter: unprefixed keys and metadata.
        var unprefixed = Variant(t =>
        {
            foreach (var k in t.Keys.ToList()) { t[k["transformer.".Length..]] = t[k]; t.Remove(k); }
        }, new Dictionary<string, string> { [LoraFormats.DiffusersMetadataKey] = "{\"lora_alpha\": 16, \"r\": 4, \"use_rslora\": true}" });
        using var u = LoraFormats.Load(unprefixed, _targets);
        Assert.Equal(16.0 / 2.0, u.Scaling("transformer_blocks.0.attn.to_q"));
    }
}
