using System.CommandLine;
using LlmSnp.Checkpoint;

/// <summary>`llmsnp convert`: the same checkpoint as safetensors, its weights in another dtype or as stored.</summary>
static class ConvertCommand
{
    public static Command Build()
    {
        var model = Cli.ModelOption();
        var outDir = new Option<string>("--out") { Description = "output directory", Required = true };
        var to = new Option<string>("--to") { Description = "float32, float16 or bfloat16 (default: as stored; a pytorch_model.bin checkpoint becomes safetensors)" };
        var cmd = new Command("convert", "rewrite a checkpoint (safetensors or pytorch_model.bin) as safetensors, optionally in another dtype") { model, outDir, to, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => CheckpointConvert.Run(p.GetValue(model)!, p.GetValue(outDir)!, p.GetValue(to) is string s ? CheckpointConvert.ParseTarget(s) : null)));
        return cmd;
    }
}
