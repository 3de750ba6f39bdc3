using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Models;

namespace LlmSnp.Tests;

/// <summary>
/// The families' own tokenizers against independent ids (tests/fixtures/tokenizers, written by
/// tools/reference/family_tokenizers.py): a Gemma-style SentencePiece model against the sentencepiece library, a
/// Qwen3-style byte-level BPE tokenizer.json against a second BPE encoder.
/// </summary>
public class FamilyTokenizerTests
{
    internal static string Tokenizer(string name) => Repo.Fixture(Path.Combine("tokenizers", name));

    internal static (string[] Texts, int[][] Ids) Expected(string name)
    {
        var j = JsonNode.Parse(File.ReadAllText(Path.Combine(Tokenizer(name), "expected.json")))!;
        return (j["texts"]!.AsArray().Select(t => (string)t!).ToArray(), j["ids"]!.AsArray().Select(a => a!.AsArray().Select(x => (int)x!).ToArray()).ToArray());
    }

    /// <summary>A golden-family fixture with a tokenizer's files beside its weights (both have 512 ids).</summary>
    internal static string WithTokenizer(TempDir tmp, string fixture, string tokenizer, string? name = null)
    {
        string dir = tmp.Sub(name ?? fixture + "-" + tokenizer);
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(FamilyGoldenTests.Fixture(fixture)).Concat(Directory.GetFiles(Tokenizer(tokenizer))))
            if (Path.GetFileName(f) is not ("golden.json" or "expected.json")) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        return dir;
    }

    [Theory]
    [InlineData("gemma2")]
    [InlineData("gemma3_text")]
    public void Gemma_sentencepiece_ids_equal_the_sentencepiece_librarys(string fixture)
    {
        using var tmp = new TempDir();
        using var model = ModelFamilies.OpenLanguageModel(WithTokenizer(tmp, fixture, "gemma-spm"));
        var tok = model.Tokenizer();
        Assert.IsType<SentencePieceTokenizer>(tok);
        Assert.Equal(2, tok.BosId);
        Assert.Equal(1, tok.EosId);
        var (texts, ids) = Expected("gemma-spm");
        for (int i = 0; i < texts.Length; i++) Assert.Equal(ids[i], tok.Encode(texts[i]));
        Assert.Equal(texts[0], tok.Decode(ids[0].Skip(1)));
    }

    [Fact]
    public void Qwen3_byte_level_bpe_ids_equal_a_second_encoders()
    {
        using var tmp = new TempDir();
        using var model = ModelFamilies.OpenLanguageModel(WithTokenizer(tmp, "qwen3", "qwen-bpe"));
        var tok = model.Tokenizer();
        Assert.IsType<HfTokenizer>(tok);
        Assert.Null(tok.BosId);   // Qwen prepends nothing
        var (texts, ids) = Expected("qwen-bpe");
        for (int i = 0; i < texts.Length; i++) Assert.Equal(ids[i], tok.Encode(texts[i]));
        Assert.Equal(texts[0], tok.Decode(ids[0]));
    }
}
