using static TorchSharp.torch;

namespace RealAlign.Core.Rewards;

/// <summary>A reward to load: <c>--reward NAME=KIND:DIR</c>.</summary>
public sealed record RewardDefinition(string Name, string Kind, string Directory);

/// <summary>
/// The rewards a server serves, by name. Built from <c>--reward NAME=KIND:DIR</c> definitions:
/// <list type="bullet">
/// <item>KIND ∈ pickscore, clip_score, sgp_pickscore (PickScore_v1-layout CLIPModel folders), aesthetic, hpsv2;
/// CLIPModel folders named by several definitions are loaded once and shared;</item>
/// <item>no definitions: the embedded tiny CLIP (<see cref="TinyClipReward"/>) serves <c>pickscore</c> and <c>clip_score</c>;</item>
/// <item><c>sgp_pickscore</c> is added from the first pickscore-kind reward (preferring one named
/// <c>pickscore</c>) when no reward has that name;</item>
/// <item>the statistics <c>colorfulness</c>, <c>laplacian_variance</c>, <c>jpeg_size</c> are always there
/// (unless a definition took the name).</item>
/// </list>
/// </summary>
public sealed class RewardRegistry : IDisposable
{
    private readonly Dictionary<string, IRewardScorer> _byName;
    private readonly List<ClipRewardModel> _sharedClips;

    public IReadOnlyList<IRewardScorer> Scorers { get; }

    private RewardRegistry(List<IRewardScorer> scorers, List<ClipRewardModel> sharedClips)
    {
        Scorers = scorers;
        _byName = scorers.ToDictionary(s => s.Name, StringComparer.Ordinal);
        _sharedClips = sharedClips;
    }

    public static RewardRegistry Load(IReadOnlyList<RewardDefinition> definitions, Device device)
    {
        var scorers = new List<IRewardScorer>();
        var clips = new Dictionary<string, ClipRewardModel>(StringComparer.Ordinal);
        ClipRewardModel Clip(string dir) =>
            clips.TryGetValue(Path.GetFullPath(dir), out var c) ? c : clips[Path.GetFullPath(dir)] = ClipRewardModel.FromPretrained(dir, device);
        try
        {
            foreach (var d in definitions)
            {
                if (scorers.Any(s => s.Name == d.Name)) throw new ArgumentException($"reward name '{d.Name}' is given twice");
                scorers.Add(d.Kind switch
                {
                    RewardKinds.PickScore => new PickScoreScorer(d.Name, Clip(d.Directory), ownsModel: false),
                    RewardKinds.ClipScore => new ClipScoreScorer(d.Name, Clip(d.Directory), ownsModel: false),
                    RewardKinds.SgpPickScore => new SgpPickScoreScorer(d.Name, Clip(d.Directory), ownsModel: false),
                    RewardKinds.Aesthetic => AestheticScorer.FromPretrained(d.Name, d.Directory, device),
                    RewardKinds.HpsV2 => HpsV2Scorer.FromPretrained(d.Name, d.Directory, device),
                    _ => throw new ArgumentException(
                        $"reward '{d.Name}': unknown kind '{d.Kind}' (expected one of {string.Join(", ", RewardKinds.Loadable)})"),
                });
            }
            if (definitions.Count == 0)
            {
                var tiny = TinyClipReward.Create(device);
                clips["(embedded)"] = tiny;
                scorers.Add(new PickScoreScorer(RewardKinds.PickScore, tiny, ownsModel: false));
                scorers.Add(new ClipScoreScorer(RewardKinds.ClipScore, tiny, ownsModel: false));
            }
            if (scorers.All(s => s.Name != RewardKinds.SgpPickScore))
            {
                var pick = scorers.OfType<PickScoreScorer>().OrderBy(s => s.Name == RewardKinds.PickScore ? 0 : 1).FirstOrDefault();
                if (pick is not null) scorers.Add(new SgpPickScoreScorer(RewardKinds.SgpPickScore, pick.Clip, ownsModel: false));
            }
            foreach (var stat in ImageStatisticScorer.All())
                if (scorers.All(s => s.Name != stat.Name)) scorers.Add(stat);
            return new RewardRegistry(scorers, clips.Values.ToList());
        }
        catch
        {
            foreach (var s in scorers) s.Dispose();
            foreach (var c in clips.Values) c.Dispose();
            throw;
        }
    }

    public IRewardScorer Get(string name) =>
        _byName.TryGetValue(name, out var s) ? s : throw new RewardNotFoundException(name, _byName.Keys.Order(StringComparer.Ordinal));

    public bool Contains(string name) => _byName.ContainsKey(name);

    public void Dispose()
    {
        foreach (var s in Scorers) s.Dispose();
        foreach (var c in _sharedClips) c.Dispose();
    }
}
