namespace LlmSnp.Data;

/// <summary>Locates the files the product ships (models/, eval/data/) from the binary's location.</summary>
public static class RepoPaths
{
    static readonly Lazy<string> RootLazy = new(FindRoot);
    public static string Root => RootLazy.Value;
    /// <summary>The OPT tokenizer (vocab.json + merges.txt): the bundled OPT's own, kept once, in its model directory.</summary>
    public static string OptTokenizer => Path.Combine(Root, "models", "opt-tiny-c4-v2");
    public static string EvalData => Path.Combine(Root, "eval", "data");

    static string FindRoot()
    {
        string? env = Environment.GetEnvironmentVariable("LLMSNP_HOME");
        if (!string.IsNullOrEmpty(env)) return env;
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d != null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "LlmSnp.sln"))) return d.FullName;
        return Directory.GetCurrentDirectory();
    }
}
