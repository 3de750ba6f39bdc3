using System.Runtime.CompilerServices;

namespace LlmSnp.Tests;

static class AssemblySetup
{
    /// <summary>Allocator and GEMM thread settings must reach libtorch before its first use, as the CLI sets them.</summary>
    [ModuleInitializer]
    internal static void Init()
    {
        Runtime.ConfigureHostMemory();
        Runtime.ConfigureThreads();
    }
}
