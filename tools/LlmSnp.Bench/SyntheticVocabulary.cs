using System.Text;

namespace LlmSnp.Benchmarks;

/// <summary>
/// A SentencePiece `tokenizer.model` for a random-weight checkpoint: the checkpoint must carry a tokenizer
/// of its own (the GGUF export writes its vocabulary for llama.cpp), and speed does not depend on the pieces.
/// &lt;unk&gt;, &lt;s&gt;, &lt;/s&gt;, the 256 byte pieces, then filler pieces up to the vocabulary size (BPE, byte fallback).
/// </summary>
public static class SyntheticVocabulary
{
    public static void Write(string path, int vocab)
    {
        using var ms = new MemoryStream();
        for (int i = 0; i < vocab; i++)
        {
            (string piece, int type) = i switch
            {
                0 => ("<unk>", 2), 1 => ("<s>", 3), 2 => ("</s>", 3),
                < 259 => ($"<0x{i - 3:X2}>", 6),
                _ => ($"\u2581t{i}", 1),
            };
            using var p = new MemoryStream();
            Bytes(p, 1, Encoding.UTF8.GetBytes(piece));
            Tag(p, 2, 5); p.Write(BitConverter.GetBytes(-(float)i));   // fixed32 score: later pieces merge later
            Tag(p, 3, 0); Varint(p, (ulong)type);
            Bytes(ms, 1, p.ToArray());
        }
        using var trainer = new MemoryStream();
        Tag(trainer, 3, 0); Varint(trainer, 2);   // model_type BPE
        Tag(trainer, 40, 0); Varint(trainer, 0); Tag(trainer, 41, 0); Varint(trainer, 1); Tag(trainer, 42, 0); Varint(trainer, 2);
        Bytes(ms, 2, trainer.ToArray());
        using var norm = new MemoryStream();
        Bytes(norm, 1, Encoding.UTF8.GetBytes("identity"));
        Bytes(ms, 3, norm.ToArray());
        File.WriteAllBytes(path, ms.ToArray());
    }

    static void Tag(Stream s, int field, int wire) => Varint(s, (ulong)((field << 3) | wire));

    static void Varint(Stream s, ulong v)
    {
        while (v >= 0x80) { s.WriteByte((byte)(v | 0x80)); v >>= 7; }
        s.WriteByte((byte)v);
    }

    static void Bytes(Stream s, int field, byte[] b)
    {
        Tag(s, field, 2);
        Varint(s, (ulong)b.Length);
        s.Write(b);
    }
}
