using static TorchSharp.torch;

namespace LlmSnp.Checkpoint;

/// <summary>
/// One weight file of a checkpoint: a safetensors file or a PyTorch `pytorch_model.bin`. Both are validated
/// whole when opened and memory-mapped; a tensor's bytes are copied out only when it is read.
/// </summary>
public interface ITensorFile : IDisposable
{
    string Path { get; }
    IReadOnlyDictionary<string, TensorEntry> Tensors { get; }
    /// <summary>safetensors `__metadata__` (a tied tensor's alias among them); empty for a .bin.</summary>
    IReadOnlyDictionary<string, string> Metadata { get; }
    /// <summary>Reads one tensor in its stored dtype, on the CPU.</summary>
    Tensor Read(string name);
    /// <summary>Reads one tensor converted to <paramref name="dtype"/>, on the CPU.</summary>
    Tensor ReadConverted(string name, ScalarType dtype);
    /// <summary>Reads one tensor into a contiguous CPU tensor of its shape (any dtype), overwriting it.</summary>
    void ReadInto(string name, Tensor destination);
    /// <summary>Whether two tensors are one stored tensor (a tied weight saved once under two names).</summary>
    bool SameStorage(string a, string b);
}
