using TorchSharp;
using Xunit;

namespace LlmSnp.Tests;

public class RuntimeTests
{
    static long AnonHugePagesBytes()
    {
        foreach (var line in File.ReadLines("/proc/self/smaps_rollup"))
            if (line.StartsWith("AnonHugePages:"))
                return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;
        return 0;
    }

    [Fact]
    public void Large_tensors_are_backed_by_huge_pages_where_the_kernel_offers_them()
    {
        // The module initializer set the allocator up as the CLI does; without THP_MEM_ALLOC_ENABLE reaching
        // libtorch before its first allocation, a tensor is mapped in 4 KiB pages and this count stays put.
        const string mode = "/sys/kernel/mm/transparent_hugepage/enabled";
        if (!OperatingSystem.IsLinux() || !File.Exists(mode) || File.ReadAllText(mode).Contains("[never]")) return;
        long before = AnonHugePagesBytes();
        using var t = torch.ones(64L << 20);   // 256 MiB, every page written
        long after = AnonHugePagesBytes();
        Assert.True(after - before >= 64L << 20, $"AnonHugePages {before >> 20} → {after >> 20} MiB around a 256 MiB tensor");
    }
}
