using System.CommandLine;
using LlmSnp.Export;

/// <summary>`llmsnp export gguf`: a checkpoint (dense or pruned) as a GGUF file for llama.cpp.</summary>
static class ExportCommand
{
    public static Command Build()
    {
        var model = Cli.ModelOption();
        var outFile = new Option<string>("--out") { Description = "GGUF file to write (atomically)", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "f32 or f16 for the 2-D weights (norms and biases stay f32)", DefaultValueFactory = _ => "f16" };
        var gguf = new Command("gguf", "write a llama/mistral/qwen2 checkpoint as GGUF (arch llama, or deci when layer widths differ)") { model, outFile, dtype, Cli.Json };
        gguf.SetAction(p => Cli.Run(p, () => GgufExport.Run(p.GetValue(model)!, p.GetValue(outFile)!, GgufExport.ParseDType(p.GetValue(dtype)!)).ToJson()));
        return new Command("export", "write a checkpoint in another tool's format") { gguf };
    }
}
