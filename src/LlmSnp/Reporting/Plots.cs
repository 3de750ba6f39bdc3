namespace LlmSnp.Reporting;

/// <summary>PNG plots for the comparison report (ScottPlot, headless).</summary>
public static class Plots
{
    /// <summary>Metric vs fraction of prunable parameters removed, one line per method, dense as a horizontal line.</summary>
    public static void MetricVsRemoved(string path, string title, string metric, bool higherIsBetter, double dense,
        IReadOnlyList<(string Method, List<(double Removed, double Value)> Points)> series)
    {
        var plt = new ScottPlot.Plot();
        plt.Title(title);
        plt.XLabel("fraction of prunable parameters removed");
        plt.YLabel(metric);
        var palette = new ScottPlot.Palettes.Category10();
        int i = 0;
        foreach (var (method, points) in series)
        {
            var ordered = points.Prepend((0.0, dense)).OrderBy(p => p.Item1).ToArray();
            var s = plt.Add.Scatter(ordered.Select(p => p.Item1).ToArray(), ordered.Select(p => p.Item2).ToArray());
            s.LegendText = method;
            s.Color = palette.GetColor(i++);
            s.LineWidth = 2;
            s.MarkerSize = 6;
        }
        var h = plt.Add.HorizontalLine(dense);
        h.LegendText = "dense";
        h.Color = ScottPlot.Colors.Black;
        h.LinePattern = ScottPlot.LinePattern.Dashed;
        // Keep the methods worth comparing readable: a collapsing baseline should not flatten the rest.
        var all = series.SelectMany(s => s.Points.Select(p => p.Value)).Append(dense).Where(double.IsFinite).ToArray();
        if (!higherIsBetter)
        {
            double cap = Math.Min(all.Max(), dense * 4);
            plt.Axes.SetLimitsY(Math.Min(all.Min(), dense) * 0.95, cap * 1.05);
        }
        else plt.Axes.SetLimitsY(Math.Max(0, all.Min() - 2), Math.Min(100, all.Max() + 2));
        plt.ShowLegend(higherIsBetter ? ScottPlot.Alignment.LowerLeft : ScottPlot.Alignment.UpperLeft);   // away from the dense start
        plt.SavePng(path, 1000, 650);
    }
}
