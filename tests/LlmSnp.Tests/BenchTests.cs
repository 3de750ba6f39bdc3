using LlmSnp.Benchmarks;
using Xunit;

namespace LlmSnp.Tests;

public class BenchTests
{
    // Lines as the kernel writes them: the number is right-aligned after a tab in 8 columns,
    // so from 10 GB (8 digits of kB) there is no space left between the tab and the number.
    [Theory]
    [InlineData("Name:\tdotnet\nRssAnon:\t  123456 kB\nRssFile:\t   10 kB\n", 123456L * 1024)]
    [InlineData("RssAnon:\t15323048 kB\n", 15323048L * 1024)]
    [InlineData("RssAnon:\t123456789 kB", 123456789L * 1024)]
    [InlineData("Name:\tdotnet\nVmRSS:\t 100 kB\n", 0L)]
    public void RssAnon_is_parsed_at_every_width(string status, long bytes) =>
        Assert.Equal(bytes, MemoryMonitor.ParseRssAnon(System.Text.Encoding.ASCII.GetBytes(status)));

    [Fact]
    public void The_sampling_thread_sees_a_transient_peak()
    {
        if (!OperatingSystem.IsLinux()) return;
        const int size = 96 << 20;
        using var monitor = new MemoryMonitor();
        var start = MemoryMonitor.Sample();
        var p = System.Runtime.InteropServices.Marshal.AllocHGlobal(size);
        // Native memory, every page touched: the managed GC cannot decommit anything between samples.
        for (int off = 0; off < size; off += 4096) System.Runtime.InteropServices.Marshal.WriteByte(p, off, 1);
        Assert.True(MemoryMonitor.Sample() >= start + (80 << 20), "96 MB touched should show in RssAnon");
        Thread.Sleep(200);   // ten sampling periods
        System.Runtime.InteropServices.Marshal.FreeHGlobal(p);   // glibc returns a block this large at once
        Thread.Sleep(50);
        Assert.True(MemoryMonitor.Sample() < start + (48 << 20), "the block was returned");
        Assert.True(monitor.PeakAnonBytes >= start + (80 << 20), $"peak {monitor.PeakAnonBytes} should include the 96 MB block over {start}");
    }
}
