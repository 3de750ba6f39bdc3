using System.Buffers.Binary;
using System.Text;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// An independent GGUF v3 reader for the tests: it parses the bytes the exporter wrote (not through
/// the writer's code) and checks the layout rules as it goes.
/// </summary>
sealed class GgufFile
{
    public sealed record TensorInfo(string Name, ulong[] Ne, uint Type, ulong Offset);

    public uint Version { get; private set; }
    public Dictionary<string, (uint Type, object Value)> Kv { get; } = new(StringComparer.Ordinal);
    public List<string> KeyOrder { get; } = new();
    public List<TensorInfo> Tensors { get; } = new();
    public long DataStart { get; private set; }
    public byte[] Bytes { get; }

    GgufFile(byte[] bytes) => Bytes = bytes;

    public static GgufFile Read(string path)
    {
        var f = new GgufFile(File.ReadAllBytes(path));
        int pos = 0;
        var b = f.Bytes;
        uint U32() { var v = BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(pos)); pos += 4; return v; }
        ulong U64() { var v = BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(pos)); pos += 8; return v; }
        string Str() { int n = checked((int)U64()); var s = Encoding.UTF8.GetString(b, pos, n); pos += n; return s; }
        object Scalar(uint t) => t switch
        {
            4 => U32(),
            5 => (int)U32(),
            6 => BitConverter.Int32BitsToSingle((int)U32()),
            7 => b[pos++] switch { 0 => false, 1 => true, var x => throw new InvalidDataException($"bool byte {x}") },
            8 => Str(),
            10 => U64(),
            _ => throw new InvalidDataException($"unexpected GGUF value type {t}"),
        };
        Assert.Equal("GGUF", Encoding.ASCII.GetString(b, 0, 4));
        pos = 4;
        f.Version = U32();
        ulong nTensors = U64(), nKv = U64();
        for (ulong i = 0; i < nKv; i++)
        {
            string key = Str();
            uint type = U32();
            object value;
            if (type == 9)
            {
                uint et = U32();
                int n = checked((int)U64());
                var items = new object[n];
                for (int k = 0; k < n; k++) items[k] = Scalar(et);
                value = (et, items);
            }
            else value = Scalar(type);
            Assert.True(f.Kv.TryAdd(key, (type, value)), $"duplicate key {key}");
            f.KeyOrder.Add(key);
        }
        for (ulong i = 0; i < nTensors; i++)
        {
            string name = Str();
            uint nd = U32();
            var ne = new ulong[nd];
            for (int d = 0; d < nd; d++) ne[d] = U64();
            uint type = U32();
            ulong off = U64();
            f.Tensors.Add(new TensorInfo(name, ne, type, off));
        }
        uint align = f.Kv.TryGetValue("general.alignment", out var a) ? (uint)a.Value : 32u;
        f.DataStart = (pos + align - 1) / align * align;
        for (long k = pos; k < f.DataStart; k++) Assert.Equal(0, b[k]);
        return f;
    }

    public object Value(string key) => Kv.TryGetValue(key, out var v) ? v.Value : throw new KeyNotFoundException(key);
    public T Scalar<T>(string key) => (T)Value(key);
    public T[] Array<T>(string key) => (((uint, object[]))Value(key)).Item2.Cast<T>().ToArray();
    public uint ArrayType(string key) => (((uint, object[]))Value(key)).Item1;
    public TensorInfo Tensor(string name) => Tensors.Single(t => t.Name == name);

    public static long ElementSize(uint type) => type switch { 0 => 4, 1 => 2, _ => throw new InvalidDataException($"ggml type {type}") };
    public static long ByteSize(TensorInfo t) => t.Ne.Aggregate(1L, (x, d) => x * (long)d) * ElementSize(t.Type);

    /// <summary>The tensor's values as float64, row-major (ggml ne[0] innermost), whatever its stored type.</summary>
    public double[] Values(string name)
    {
        var t = Tensor(name);
        long n = t.Ne.Aggregate(1L, (x, d) => x * (long)d);
        var r = new double[n];
        int start = checked((int)(DataStart + (long)t.Offset));
        for (long i = 0; i < n; i++)
            r[i] = t.Type == 0
                ? BinaryPrimitives.ReadSingleLittleEndian(Bytes.AsSpan(start + (int)i * 4))
                : (double)BinaryPrimitives.ReadHalfLittleEndian(Bytes.AsSpan(start + (int)i * 2));
        return r;
    }
}

/// <summary>
/// An independent float64 forward of a HF LLaMA checkpoint (modeling_llama semantics), written for
/// the tests only: RMSNorm x·rsqrt(mean(x²)+eps)·w; rotate-half RoPE with inv_freq = θ^(−2i/d);
/// grouped-query attention where query head h reads K/V head h ÷ (heads / kv_heads); SwiGLU
/// down(silu(gate(x))·up(x)); optional biases; final norm; tied or separate head. Per-layer head
/// counts and FFN widths come from the tensor shapes, so it also runs a per-layer pruned checkpoint.
/// </summary>
sealed class LlamaReference : IDisposable
{
    readonly Dictionary<string, Tensor> _w;
    readonly int _layers, _headDim;
    readonly double _eps, _theta;

    public LlamaReference(Dictionary<string, Tensor> float64Weights, int layers, int headDim, double eps, double theta)
    {
        _w = float64Weights; _layers = layers; _headDim = headDim; _eps = eps; _theta = theta;
    }

    public static LlamaReference Load(string dir, int layers, int headDim, double eps, double theta)
    {
        using var r = new Checkpoint.CheckpointReader(dir);
        var w = r.Names.ToDictionary(n => n, n => r.Read(n, ScalarType.Float64, CPU).DetachFromDisposeScope());
        return new LlamaReference(w, layers, headDim, eps, theta);
    }

    Tensor? Opt(string name) => _w.TryGetValue(name, out var t) ? t : null;

    Tensor Rms(Tensor x, Tensor w) => x * torch.rsqrt(x.pow(2).mean([-1], keepdim: true) + _eps) * w;

    static Tensor Linear(Tensor x, Tensor w, Tensor? b) { var y = x.matmul(w.t()); return b is null ? y : y + b; }

    Tensor Rope(Tensor x /* [heads, T, d] */, Tensor cos, Tensor sin)
    {
        long half = _headDim / 2;
        var x1 = x.narrow(-1, 0, half);
        var x2 = x.narrow(-1, half, half);
        var rotated = torch.cat([-x2, x1], -1);
        return x * cos + rotated * sin;
    }

    /// <summary>Logits [T, vocab] of one forward from position 0.</summary>
    public Tensor Logits(long[] ids) => Logits([ids])[0];

    /// <summary>
    /// Logits [B, T, vocab] of B independent forwards from position 0 (equal lengths), batched so a
    /// run makes few, large tensor ops (on a shared 2-core machine each op's thread hand-off costs).
    /// </summary>
    public Tensor Logits(long[][] windows)
    {
        long B = windows.Length, T = windows[0].Length, d = _headDim;
        var x = _w["model.embed_tokens.weight"].index_select(0, torch.tensor(windows.SelectMany(w => w).ToArray())).reshape(B, T, -1);
        var inv = torch.tensor(Enumerable.Range(0, (int)d / 2).Select(i => Math.Pow(_theta, -2.0 * i / d)).ToArray());
        var ang = torch.outer(torch.arange(T, ScalarType.Float64), inv);
        var cos = torch.cat([ang.cos(), ang.cos()], -1);
        var sin = torch.cat([ang.sin(), ang.sin()], -1);
        for (int i = 0; i < _layers; i++)
        {
            string p = $"model.layers.{i}.";
            var h = Rms(x, _w[p + "input_layernorm.weight"]);
            var wq = _w[p + "self_attn.q_proj.weight"];
            var wk = _w[p + "self_attn.k_proj.weight"];
            long heads = wq.shape[0] / d, kv = wk.shape[0] / d;
            var q = Linear(h, wq, Opt(p + "self_attn.q_proj.bias")).reshape(B, T, heads, d).transpose(1, 2);
            var k = Linear(h, wk, Opt(p + "self_attn.k_proj.bias")).reshape(B, T, kv, d).transpose(1, 2);
            var v = Linear(h, _w[p + "self_attn.v_proj.weight"], Opt(p + "self_attn.v_proj.bias")).reshape(B, T, kv, d).transpose(1, 2);
            q = Rope(q, cos, sin);
            k = Rope(k, cos, sin);
            long group = heads / kv;
            // Query head hq reads K/V head hq / group.
            var kvIndex = torch.tensor(Enumerable.Range(0, (int)heads).Select(hq => (long)(hq / group)).ToArray());
            k = k.index_select(1, kvIndex);
            v = v.index_select(1, kvIndex);
            // softmax(q·kᵀ/√d + causal mask)·v, as transformers' sdpa attention computes it (fused on CPU, float64 kept).
            var att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_casual: true).transpose(1, 2).reshape(B, T, heads * d);
            x = x + Linear(att, _w[p + "self_attn.o_proj.weight"], Opt(p + "self_attn.o_proj.bias"));
            var h2 = Rms(x, _w[p + "post_attention_layernorm.weight"]);
            var g = Linear(h2, _w[p + "mlp.gate_proj.weight"], Opt(p + "mlp.gate_proj.bias"));
            var u = Linear(h2, _w[p + "mlp.up_proj.weight"], Opt(p + "mlp.up_proj.bias"));
            x = x + Linear(torch.nn.functional.silu(g) * u, _w[p + "mlp.down_proj.weight"], Opt(p + "mlp.down_proj.bias"));
        }
        x = Rms(x, _w["model.norm.weight"]);
        return x.matmul((Opt("lm_head.weight") ?? _w["model.embed_tokens.weight"]).t());
    }

    /// <summary>LlmSnp's protocol: non-overlapping windows from 0, tail dropped, mean NLL of the seqLen − 1 predictions of each.</summary>
    public double Perplexity(IReadOnlyList<int> ids, int seqLen, int windows, int batch = 5)
    {
        double nll = 0;
        long count = 0;
        for (int w0 = 0; w0 < windows; w0 += batch)
        {
            using var scope = torch.NewDisposeScope();
            var wins = Enumerable.Range(w0, Math.Min(batch, windows - w0))
                .Select(w => ids.Skip(w * seqLen).Take(seqLen).Select(i => (long)i).ToArray()).ToArray();
            var logp = torch.nn.functional.log_softmax(Logits(wins).narrow(1, 0, seqLen - 1), -1);
            var target = torch.tensor(wins.SelectMany(w => w.Skip(1)).ToArray()).reshape(wins.Length, seqLen - 1, 1);
            nll -= logp.gather(2, target).sum().item<double>();
            count += wins.Length * (long)(seqLen - 1);
        }
        return Math.Exp(nll / count);
    }

    public void Dispose()
    {
        foreach (var t in _w.Values) t.Dispose();
    }
}
