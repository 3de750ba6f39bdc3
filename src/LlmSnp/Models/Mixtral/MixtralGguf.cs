using LlmSnp.Export;

namespace LlmSnp.Models;

/// <summary>
/// Mixtral as llama.cpp's `llama` architecture with experts (what its converter writes for Mixtral): q/k rows back to
/// interleaved RoPE pairs, `llama.expert_count` / `expert_used_count`, and `feed_forward_length` the experts' width.
/// </summary>
public sealed class MixtralGguf : MoeGguf
{
    protected override string Architecture => "llama";
    protected override bool InterleavedRope => true;
    protected override MoeConfig Parse(ConfigFile cfg) => MixtralConfig.From(cfg);

    protected override void ExtraMetadata(GgufWriter w, MoeConfig c) =>
        w.AddUInt32("llama.feed_forward_length", (uint)c.ExpertWidths[0][0]);
}
