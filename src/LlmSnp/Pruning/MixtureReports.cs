using System.Text.Json.Nodes;

namespace LlmSnp.Pruning;

/// <summary>pruning_config.json's part for mixtures: expert options, per sparse layer what the experts did, active parameters.</summary>
public static class MixtureReports
{
    public static void AddTo(JsonObject report, PruneOptions o, IReadOnlyList<MixtureReport> layers, long activeBefore, long activeAfter)
    {
        var e = o.Experts;
        report["options"]!["experts_keep"] = e?.Describe();
        report["options"]!["experts_criterion"] = e is null ? null : ExpertOptions.Name(e.Criterion);
        report["options"]!["experts_fold"] = e is null ? null : ExpertOptions.Name(e.Fold);
        report["options"]!["experts_few_tokens"] = o.FewTokenExperts == FewTokenPolicy.KeepWhole ? "keep" : "damp";
        report["active_params_before"] = activeBefore;
        report["active_params_after"] = activeAfter;
        report["experts"] = new JsonArray(layers.Select(l => (JsonNode)ToJson(l)).ToArray());
    }

    static JsonObject ToJson(MixtureReport l) => new()
    {
        ["name"] = l.Name, ["experts"] = l.Experts, ["experts_kept"] = l.Kept.Length, ["top_k"] = l.TopK, ["tokens"] = l.Tokens,
        ["kept"] = new JsonArray(l.Kept.Select(x => (JsonNode)x).ToArray()),
        ["criterion"] = l.Criterion, ["fold"] = l.Fold,
        ["relative_error_removed"] = l.RelativeErrorRemoved, ["relative_error_folded"] = l.RelativeErrorFolded,
        ["tokens_per_expert"] = new JsonArray(l.Records.Select(r => (JsonNode)r.Tokens).ToArray()),
        ["per_expert"] = new JsonArray(l.Records.Select(r =>
        {
            var j = new JsonObject { ["expert"] = r.Expert, ["tokens"] = r.Tokens, ["score"] = r.Score, ["kept"] = r.Kept };
            if (r.Kept) { j["tokens_after_removal"] = r.TokensAfter; j["scale"] = r.Scale; }
            else j["removed_because"] = r.Why;
            return (JsonNode)j;
        }).ToArray()),
        ["few_tokens"] = new JsonArray(l.FewTokens.Select(f => (JsonNode)new JsonObject { ["expert"] = f.Expert, ["tokens"] = f.Tokens, ["handled"] = f.Handled }).ToArray()),
    };
}
