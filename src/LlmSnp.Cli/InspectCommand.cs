using System.CommandLine;
using LlmSnp.Models;

/// <summary>`llmsnp inspect`: what a checkpoint holds, every tensor checked against its config.</summary>
static class InspectCommand
{
    public static Command Build()
    {
        var model = Cli.ModelOption();
        var cmd = new Command("inspect", "family, dtype, parameter count and per-layer dims of a checkpoint") { model, Cli.Json };
        cmd.SetAction(p => Cli.Run(p, () => ModelInfo.Inspect(p.GetValue(model)!)));
        return cmd;
    }
}
