using System.Runtime.CompilerServices;

namespace LlmSnp.Tests;

static class AssemblySetup
{
    /// <summary>GEMM thread settings must reach libtorch before its first use.</summary>
    [ModuleInitializer]
    internal static void Init() => Runtime.ConfigureThreads();
}
