using System.Text.Json.Nodes;

namespace RealAlign.Core.IO;

/// <summary>
/// A diffusers pipeline folder: <c>model_index.json</c> naming one sub-folder per component
/// (<c>"transformer": ["diffusers", "SD3Transformer2DModel"]</c>; null entries mean absent).
/// </summary>
public sealed class DiffusersFolder
{
    public string Root { get; }
    public string ClassName { get; }
    public IReadOnlyDictionary<string, (string Library, string ClassName)?> Components { get; }

    private DiffusersFolder(string root, string className, Dictionary<string, (string, string)?> comps)
    {
        Root = root; ClassName = className; Components = comps;
    }

    public static DiffusersFolder Open(string root)
    {
        var index = Path.Combine(root, "model_index.json");
        if (!File.Exists(index)) throw new FileNotFoundException($"{root} is not a diffusers pipeline folder (no model_index.json)");
        var o = JsonNode.Parse(File.ReadAllText(index))!.AsObject();
        var comps = new Dictionary<string, (string, string)?>();
        foreach (var (k, v) in o)
        {
            if (k.StartsWith('_')) continue;
            if (v is JsonArray a && a.Count == 2 && a[0] is not null && a[1] is not null)
                comps[k] = (a[0]!.GetValue<string>(), a[1]!.GetValue<string>());
            else if (v is JsonArray || v is null) comps[k] = null;
        }
        return new DiffusersFolder(root, o["_class_name"]?.GetValue<string>() ?? "", comps);
    }

    public bool Has(string component) =>
        Components.TryGetValue(component, out var c) && c is not null && Directory.Exists(Path.Combine(Root, component));

    public string ComponentPath(string component) => Path.Combine(Root, component);
}
