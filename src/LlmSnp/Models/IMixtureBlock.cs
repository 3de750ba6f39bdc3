using static TorchSharp.torch;

namespace LlmSnp.Models;

/// <summary>
/// The tokens a router sent to one expert in one forward: <see cref="Slots"/> are positions in the flattened
/// [tokens · top-k] routing (token = slot ÷ k, its rank among the token's experts = slot mod k), <see cref="Weights"/>
/// the weight the expert's output carries for each ([n]), <see cref="Activations"/> the expert's unit activations
/// ([n, units]: the input of its down projection).
/// </summary>
public sealed record RoutedBatch(int Layer, int Expert, Tensor Slots, Tensor Weights, Tensor Activations);

/// <summary>
/// A block whose parallel node layers are the experts of a routed mixture (Mixtral, Qwen3-MoE): the engine removes
/// whole experts through it, and collects each expert's statistics from the tokens routed to it. The router, the
/// experts and their names stay the family's; experts are numbered by their current position (0 .. Experts−1).
/// </summary>
public interface IMixtureBlock : IPrunableBlock
{
    /// <summary>The sub-block whose node layers are the experts (null: this layer is dense).</summary>
    int? ExpertSubBlock { get; }

    /// <summary>Experts the router chooses per token.</summary>
    int TopK { get; }

    /// <summary>Original indices of the experts the block holds, in order.</summary>
    long[] KeptExperts { get; }

    /// <summary>Node layer of the expert at current position <paramref name="expert"/>.</summary>
    int ExpertLayer(int expert);

    /// <summary>
    /// Routes the residual stream entering the expert sub-block, exactly as the forward does, and hands every expert
    /// that received tokens to <paramref name="each"/> (in expert order); the experts' outputs are not computed.
    /// </summary>
    void Route(Tensor input, Action<RoutedBatch> each);

    /// <summary>
    /// Keeps only the experts at the given current positions (ascending): the router loses the other rows, their
    /// tensors and node layers leave the block. The router then picks among the kept experts as the family does
    /// (softmax over the kept logits, top-k, renormalised where the config says).
    /// </summary>
    void KeepExperts(long[] keep);

    /// <summary>Parameters of each current expert (its producers and consumer).</summary>
    long[] ExpertParameters();
}

/// <summary>A model with routed experts: what expert removal is checked against before anything runs.</summary>
public interface IMixtureModel : IPrunableModel
{
    /// <summary>Experts in every sparse layer.</summary>
    int Experts { get; }

    /// <summary>Experts the router chooses per token.</summary>
    int TopK { get; }

    /// <summary>The config field that holds the expert count (for messages): num_local_experts, num_experts.</summary>
    string ExpertsField { get; }

    /// <summary>Parameters one token uses: everything but the experts, plus top-k experts of each sparse layer (at their mean size).</summary>
    long ActiveParameterCount();
}
