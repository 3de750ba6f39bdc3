using System.Text;

namespace LlmSnp.Export;

/// <summary>
/// The parts of a SentencePiece <c>tokenizer.model</c> (a protobuf <c>ModelProto</c>) that a GGUF
/// vocabulary needs, read with a minimal protobuf decoder. Field numbers are sentencepiece_model.proto's:
/// ModelProto {1: repeated SentencePiece, 2: TrainerSpec, 3: NormalizerSpec};
/// SentencePiece {1: piece, 2: score (float), 3: type (enum, default NORMAL = 1)};
/// TrainerSpec {3: model_type, 40: unk_id, 41: bos_id, 42: eos_id, 43: pad_id};
/// NormalizerSpec {1: name, 3: add_dummy_prefix, 4: remove_extra_whitespaces} (both default true).
/// Unknown fields are skipped, as protobuf requires; malformed bytes are refused.
/// </summary>
public sealed class SentencePieceModel
{
    public enum PieceType { Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6 }

    public required IReadOnlyList<(string Piece, float Score, PieceType Type)> Pieces { get; init; }
    /// <summary>TrainerSpec.model_type: 1 unigram, 2 BPE, 3 word, 4 char.</summary>
    public int ModelType { get; init; } = 1;
    public int UnkId { get; init; }
    public int BosId { get; init; } = 1;
    public int EosId { get; init; } = 2;
    public int PadId { get; init; } = -1;
    public string NormalizerName { get; init; } = "nmt_nfkc";
    public bool AddDummyPrefix { get; init; } = true;
    public bool RemoveExtraWhitespaces { get; init; } = true;

    public static SentencePieceModel Load(string path)
    {
        if (!File.Exists(path)) throw new LlmSnpException($"{path}: file not found (a SentencePiece tokenizer.model is needed for the GGUF vocabulary)");
        byte[] b = File.ReadAllBytes(path);
        try { return Parse(b, path); }
        catch (FormatException e) { throw new LlmSnpException($"{path}: not a SentencePiece ModelProto ({e.Message})"); }
    }

    static SentencePieceModel Parse(byte[] b, string path)
    {
        var pieces = new List<(string, float, PieceType)>();
        int modelType = 1, unk = 0, bos = 1, eos = 2, pad = -1;
        string norm = "nmt_nfkc";
        bool dummy = true, extraWs = true, sawTrainer = false;
        var r = new Reader(b, 0, b.Length);
        while (r.More)
        {
            var (field, wire) = r.Tag();
            if (field == 1 && wire == 2) pieces.Add(ParsePiece(r.Sub(), pieces.Count));
            else if (field == 2 && wire == 2)
            {
                sawTrainer = true;
                var t = r.Sub();
                while (t.More)
                {
                    var (f, w) = t.Tag();
                    if (w == 0 && f is 3 or 40 or 41 or 42 or 43)
                    {
                        int v = (int)(long)t.Varint();   // int32 fields: negative values are sent sign-extended to 64 bits
                        switch (f) { case 3: modelType = v; break; case 40: unk = v; break; case 41: bos = v; break; case 42: eos = v; break; default: pad = v; break; }
                    }
                    else t.Skip(w);
                }
            }
            else if (field == 3 && wire == 2)
            {
                var n = r.Sub();
                while (n.More)
                {
                    var (f, w) = n.Tag();
                    if (f == 1 && w == 2) norm = n.String();
                    else if (f == 3 && w == 0) dummy = n.Varint() != 0;
                    else if (f == 4 && w == 0) extraWs = n.Varint() != 0;
                    else n.Skip(w);
                }
            }
            else r.Skip(wire);
        }
        if (pieces.Count == 0) throw new LlmSnpException($"{path}: the SentencePiece model has no pieces");
        if (!sawTrainer) throw new LlmSnpException($"{path}: the SentencePiece model has no trainer_spec (field 2)");
        return new SentencePieceModel
        {
            Pieces = pieces, ModelType = modelType, UnkId = unk, BosId = bos, EosId = eos, PadId = pad,
            NormalizerName = norm, AddDummyPrefix = dummy, RemoveExtraWhitespaces = extraWs,
        };
    }

    static (string, float, PieceType) ParsePiece(Reader r, int index)
    {
        string? piece = null;
        float score = 0;
        int type = 1;
        while (r.More)
        {
            var (f, w) = r.Tag();
            if (f == 1 && w == 2) piece = r.String();
            else if (f == 2 && w == 5) score = r.Fixed32();
            else if (f == 3 && w == 0) type = (int)r.Varint();
            else r.Skip(w);
        }
        if (piece == null) throw new FormatException($"piece {index} has no string");
        if (type is < 1 or > 6) throw new FormatException($"piece {index} ('{piece}') has unknown type {type}");
        return (piece, score, (PieceType)type);
    }

    /// <summary>A bounded view of protobuf bytes.</summary>
    sealed class Reader(byte[] b, int pos, int end)
    {
        int _pos = pos;
        public bool More => _pos < end;

        public ulong Varint()
        {
            ulong v = 0;
            for (int shift = 0; shift < 64; shift += 7)
            {
                if (_pos >= end) throw new FormatException("truncated varint");
                byte c = b[_pos++];
                v |= (ulong)(c & 0x7f) << shift;
                if (c < 0x80) return v;
            }
            throw new FormatException("varint longer than 10 bytes");
        }

        public (int Field, int Wire) Tag()
        {
            ulong t = Varint();
            int field = (int)(t >> 3), wire = (int)(t & 7);
            if (field == 0) throw new FormatException("field number 0");
            return (field, wire);
        }

        int Length()
        {
            ulong n = Varint();
            if (n > (ulong)(end - _pos)) throw new FormatException("length runs past the end");
            return (int)n;
        }

        public Reader Sub() { int n = Length(); var s = new Reader(b, _pos, _pos + n); _pos += n; return s; }

        public string String()
        {
            int n = Length();
            var bytes = new ReadOnlySpan<byte>(b, _pos, n);
            if (!System.Text.Unicode.Utf8.IsValid(bytes)) throw new FormatException("a string is not valid UTF-8");
            _pos += n;
            return Encoding.UTF8.GetString(bytes);
        }

        public float Fixed32()
        {
            if (end - _pos < 4) throw new FormatException("truncated fixed32");
            float v = System.Buffers.Binary.BinaryPrimitives.ReadSingleLittleEndian(new ReadOnlySpan<byte>(b, _pos, 4));
            _pos += 4;
            return v;
        }

        public void Skip(int wire)
        {
            switch (wire)
            {
                case 0: Varint(); break;
                case 1: if (end - _pos < 8) throw new FormatException("truncated fixed64"); _pos += 8; break;
                case 2: { int n = Length(); _pos += n; break; }   // not `_pos += Length()`: that reads _pos before Length() moves it
                case 5: if (end - _pos < 4) throw new FormatException("truncated fixed32"); _pos += 4; break;
                default: throw new FormatException($"unsupported wire type {wire}");
            }
        }
    }
}
