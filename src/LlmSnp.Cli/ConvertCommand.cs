using System.CommandLine;
using LlmSnp.Checkpoint;

/// <summary>`llmsnp convert`: the same checkpoint with its weights in another dtype.</summary>
static class ConvertCommand
{
    public static Command Build()
    {
        var model = Cli.ModelOption();
        var outDir = new Option<string>("--out") { Description = "output directory", Required = true };
        var to = new Option<string>("--to") { Description = "float32, float16 or bfloat16", Required = true };
        var cmd = new Command("convert", "rewrite a checkpoint's weights in another dtype") { model, outDir, to, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => CheckpointConvert.Run(p.GetValue(model)!, p.GetValue(outDir)!, CheckpointConvert.ParseTarget(p.GetValue(to)!))));
        return cmd;
    }
}
