// TorchSharp is not safe to drive from two threads at once: a garbage collection triggered by one
// can finalize a temporary Scalar (an operator's alpha, say) that the other has just passed to a
// native call. Tests therefore run one at a time; each still uses every core through libtorch.
[assembly: Xunit.CollectionBehavior(DisableTestParallelization = true)]
