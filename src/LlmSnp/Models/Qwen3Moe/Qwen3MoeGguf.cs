using LlmSnp.Export;

namespace LlmSnp.Models;

/// <summary>
/// Qwen3-MoE as llama.cpp's `qwen3moe` architecture: NEOX RoPE (rows as stored), `attn_q_norm` / `attn_k_norm`,
/// `expert_feed_forward_length` the experts' width, `feed_forward_length` the config's intermediate_size (as
/// llama.cpp's converter writes it; no layer uses it).
/// </summary>
public sealed class Qwen3MoeGguf : MoeGguf
{
    protected override string Architecture => "qwen3moe";
    protected override bool InterleavedRope => false;
    protected override MoeConfig Parse(ConfigFile cfg) => Qwen3MoeConfig.From(cfg);

    protected override void ExtraMetadata(GgufWriter w, MoeConfig c)
    {
        w.AddUInt32("qwen3moe.feed_forward_length", (uint)c.DenseWidth);
        w.AddUInt32("qwen3moe.expert_feed_forward_length", (uint)c.ExpertWidths.First(x => x.Length > 0)[0]);
    }
}
