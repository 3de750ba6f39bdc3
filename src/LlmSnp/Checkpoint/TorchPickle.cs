using System.Buffers.Binary;
using System.Numerics;
using System.Text;

namespace LlmSnp.Checkpoint;

/// <summary>A tensor as a PyTorch state dict pickles it: a view (offset, shape, strides in elements) of a storage.</summary>
public sealed record TorchTensorRef(TorchStorageRef Storage, long Offset, long[] Shape, long[] Stride);

/// <summary>A storage a pickle refers to by key (zip: the entry `data/KEY`; legacy: the KEY-th blob after the pickles).</summary>
public sealed record TorchStorageRef(string Key, SafeDType DType, long NumElements);

/// <summary>
/// A restricted unpickler for `torch.save` state dicts. Nothing is ever called: the pickle is read as data,
/// and the only globals it may name are the ones that rebuild tensors (<see cref="Allowed"/>); any other
/// global (`posix.system`, `builtins.eval`, a model class ...) refuses the whole file with one line naming
/// it. Opcodes that construct arbitrary objects (INST, OBJ, NEWOBJ, EXT*) are refused the same way.
/// The result is the state dict: tensor name → <see cref="TorchTensorRef"/>.
/// </summary>
public sealed class TorchPickle
{
    /// <summary>Storage classes `torch.save` names in persistent ids, with the dtype of their elements.</summary>
    static readonly Dictionary<string, SafeDType> StorageTypes = new(StringComparer.Ordinal)
    {
        ["torch.DoubleStorage"] = SafeDType.F64, ["torch.FloatStorage"] = SafeDType.F32, ["torch.HalfStorage"] = SafeDType.F16,
        ["torch.BFloat16Storage"] = SafeDType.BF16, ["torch.LongStorage"] = SafeDType.I64, ["torch.IntStorage"] = SafeDType.I32,
        ["torch.ShortStorage"] = SafeDType.I16, ["torch.CharStorage"] = SafeDType.I8, ["torch.ByteStorage"] = SafeDType.U8,
        ["torch.BoolStorage"] = SafeDType.BOOL,
    };

    const string RebuildTensorV2 = "torch._utils._rebuild_tensor_v2", RebuildTensor = "torch._utils._rebuild_tensor",
        RebuildParameter = "torch._utils._rebuild_parameter", OrderedDict = "collections.OrderedDict";

    /// <summary>Every global a state dict may name: the tensor rebuilders, the storage classes and OrderedDict.</summary>
    public static IReadOnlyCollection<string> Allowed { get; } =
        new[] { RebuildTensorV2, RebuildTensor, RebuildParameter, OrderedDict }.Concat(StorageTypes.Keys).ToArray();

    /// <summary>Bounds that no real state dict comes near; a hostile pickle cannot make the reader allocate past them.</summary>
    const int MaxStack = 1 << 20, MaxMemo = 1 << 22, MaxDims = 64;

    sealed record Global(string Name);
    sealed class Mark { public static readonly Mark Instance = new(); }
    sealed class Dict { public readonly List<KeyValuePair<object?, object?>> Items = new(); public readonly HashSet<string> Names = new(StringComparer.Ordinal); }
    sealed record Tuple(object?[] Items);

    readonly string _where;
    readonly ReadOnlyMemory<byte> _data;
    int _pos;
    readonly List<object?> _stack = new();
    readonly List<int> _marks = new();
    readonly Dictionary<long, object?> _memo = new();
    readonly Func<object?[], TorchStorageRef> _persistent;

    TorchPickle(string where, ReadOnlyMemory<byte> data, Func<object?[], TorchStorageRef> persistent)
    {
        _where = where; _data = data; _persistent = persistent;
    }

    LlmSnpException Bad(string why) => new($"{_where}: {why}");

    /// <summary>Reads one pickle starting at <paramref name="start"/>; returns the object and the offset after its STOP.</summary>
    public static (object? Value, int End) Load(string where, ReadOnlyMemory<byte> data, int start, Func<object?[], TorchStorageRef> persistent)
    {
        var p = new TorchPickle(where, data, persistent) { _pos = start };
        var v = p.Run();
        return (v, p._pos);
    }

    /// <summary>The state dict of a torch.save pickle: name → tensor view, in the pickle's order.</summary>
    public static List<KeyValuePair<string, TorchTensorRef>> StateDict(string where, object? root)
    {
        if (root is not Dict d) throw new LlmSnpException($"{where}: the pickle holds {Describe(root)}, not a state dict (a mapping of names to tensors)");
        var result = new List<KeyValuePair<string, TorchTensorRef>>(d.Items.Count);
        foreach (var (k, v) in d.Items)
        {
            if (k is not string name) throw new LlmSnpException($"{where}: state dict key {Describe(k)} is not a tensor name");
            if (v is not TorchTensorRef t) throw new LlmSnpException($"{where}: state dict entry '{name}' holds {Describe(v)}, not a tensor");
            result.Add(new(name, t));
        }
        return result;
    }

    /// <summary>A legacy-format list of storage keys.</summary>
    public static List<string> Strings(string where, object? root, string what)
    {
        if (root is not List<object?> l || l.Any(x => x is not string)) throw new LlmSnpException($"{where}: {what} is not a list of strings");
        return l.Cast<string>().ToList();
    }

    static string Describe(object? v) => v switch
    {
        null => "None", Dict => "a dict", Tuple => "a tuple", List<object?> => "a list", string s => $"the string '{Truncate(s)}'",
        Global g => $"the global {g.Name}", TorchTensorRef => "a tensor", _ => $"a {v.GetType().Name.ToLowerInvariant()}",
    };

    static string Truncate(string s) => s.Length <= 60 ? s : s[..60] + "...";

    ReadOnlySpan<byte> Take(long n)
    {
        if (n < 0 || n > _data.Length - _pos) throw Bad($"pickle truncated (needs {n} bytes at offset {_pos}, {_data.Length - _pos} left)");
        var s = _data.Span.Slice(_pos, (int)n);
        _pos += (int)n;
        return s;
    }

    byte U8() => Take(1)[0];
    ushort U16() => BinaryPrimitives.ReadUInt16LittleEndian(Take(2));
    uint U32() => BinaryPrimitives.ReadUInt32LittleEndian(Take(4));
    int I32() => BinaryPrimitives.ReadInt32LittleEndian(Take(4));
    ulong U64() => BinaryPrimitives.ReadUInt64LittleEndian(Take(8));

    string Utf8(long n)
    {
        var b = Take(n);
        if (!System.Text.Unicode.Utf8.IsValid(b)) throw Bad($"pickle string at offset {_pos - n} is not valid UTF-8");
        return Encoding.UTF8.GetString(b);
    }

    /// <summary>A GLOBAL's "module\nname\n" line (protocol 0 text, ASCII).</summary>
    string Line()
    {
        var rest = _data.Span[_pos..];
        int nl = rest.IndexOf((byte)'\n');
        if (nl < 0 || nl > 1024) throw Bad($"pickle truncated or malformed (GLOBAL name at offset {_pos})");
        var s = Encoding.ASCII.GetString(rest[..nl]);
        _pos += nl + 1;
        return s;
    }

    void Push(object? v)
    {
        if (_stack.Count >= MaxStack) throw Bad("pickle stack exceeds its bound");
        _stack.Add(v);
    }

    object? Pop()
    {
        if (_stack.Count == 0 || (_marks.Count > 0 && _stack.Count == _marks[^1])) throw Bad($"pickle pops an empty stack at offset {_pos - 1}");
        var v = _stack[^1];
        _stack.RemoveAt(_stack.Count - 1);
        return v;
    }

    object? Top => _stack.Count == 0 || (_marks.Count > 0 && _stack.Count == _marks[^1]) ? throw Bad($"pickle reads an empty stack at offset {_pos - 1}") : _stack[^1];

    List<object?> PopMark()
    {
        if (_marks.Count == 0) throw Bad($"pickle closes a MARK it never opened at offset {_pos - 1}");
        int m = _marks[^1];
        _marks.RemoveAt(_marks.Count - 1);
        var items = _stack.GetRange(m, _stack.Count - m);
        _stack.RemoveRange(m, _stack.Count - m);
        return items;
    }

    void Put(long key)
    {
        if (_memo.Count >= MaxMemo && !_memo.ContainsKey(key)) throw Bad("pickle memo exceeds its bound");
        _memo[key] = Top;
    }

    object? Get(long key) => _memo.TryGetValue(key, out var v) ? v : throw Bad($"pickle refers to memo entry {key}, which was never stored");

    object? Run()
    {
        while (true)
        {
            int at = _pos;
            byte op = U8();
            switch (op)
            {
                case 0x80: { byte proto = U8(); if (proto > 5) throw Bad($"pickle protocol {proto} is not supported"); break; }   // PROTO
                case 0x95: U64(); break;   // FRAME: a length hint only
                case (byte)'.':   // STOP
                    if (_marks.Count != 0 || _stack.Count != 1) throw Bad($"pickle ends with {_stack.Count} objects on its stack");
                    return _stack[0];
                case (byte)'(': _marks.Add(_stack.Count); break;   // MARK
                case (byte)'}': Push(new Dict()); break;
                case (byte)']': Push(new List<object?>()); break;
                case (byte)')': Push(new Tuple(Array.Empty<object?>())); break;
                case (byte)'t': Push(new Tuple(PopMark().ToArray())); break;
                case 0x85: Push(new Tuple(new[] { Pop() })); break;
                case 0x86: { var b = Pop(); var a = Pop(); Push(new Tuple(new[] { a, b })); break; }
                case 0x87: { var c = Pop(); var b = Pop(); var a = Pop(); Push(new Tuple(new[] { a, b, c })); break; }
                case (byte)'l': Push(PopMark()); break;   // LIST
                case (byte)'d': { var items = PopMark(); var d = new Dict(); SetItems(d, items); Push(d); break; }   // DICT
                case (byte)'q': Put(U8()); break;   // BINPUT
                case (byte)'r': Put(U32()); break;   // LONG_BINPUT
                case 0x94: Put(_memo.Count); break;   // MEMOIZE
                case (byte)'h': Push(Get(U8())); break;   // BINGET
                case (byte)'j': Push(Get(U32())); break;   // LONG_BINGET
                case (byte)'J': Push((long)I32()); break;   // BININT
                case (byte)'K': Push((long)U8()); break;   // BININT1
                case (byte)'M': Push((long)U16()); break;   // BININT2
                case 0x8a: Push(Long(U8())); break;   // LONG1
                case 0x8b: { int n = I32(); if (n < 0 || n > 64) throw Bad($"pickle LONG4 of {n} bytes at offset {at}"); Push(Long(n)); break; }
                case (byte)'N': Push(null); break;
                case 0x88: Push(true); break;
                case 0x89: Push(false); break;
                case (byte)'G': Push(BinaryPrimitives.ReadDoubleBigEndian(Take(8))); break;   // BINFLOAT
                case (byte)'X': Push(Utf8(U32())); break;   // BINUNICODE
                case 0x8c: Push(Utf8(U8())); break;   // SHORT_BINUNICODE
                case 0x8d: { ulong n = U64(); if (n > int.MaxValue) throw Bad($"pickle string of {n} bytes at offset {at}"); Push(Utf8((long)n)); break; }
                case (byte)'T': { int n = I32(); Push(Encoding.Latin1.GetString(Take(n))); break; }   // BINSTRING
                case (byte)'U': Push(Encoding.Latin1.GetString(Take(U8()))); break;   // SHORT_BINSTRING
                case (byte)'B': Push(Take(U32()).ToArray()); break;   // BINBYTES
                case (byte)'C': Push(Take(U8()).ToArray()); break;   // SHORT_BINBYTES
                case (byte)'0': Pop(); break;   // POP
                case (byte)'1': PopMark(); break;   // POP_MARK
                case (byte)'2': Push(Top); break;   // DUP
                case (byte)'c':   // GLOBAL
                {
                    string module = Line(), name = Line();
                    Push(Resolve(module, name));
                    break;
                }
                case 0x93:   // STACK_GLOBAL
                {
                    if (Pop() is not string name || Pop() is not string module) throw Bad($"pickle STACK_GLOBAL without module and name strings at offset {at}");
                    Push(Resolve(module, name));
                    break;
                }
                case (byte)'Q':   // BINPERSID
                {
                    if (Pop() is not Tuple pid) throw Bad($"pickle persistent id at offset {at} is not a tuple");
                    Push(_persistent(pid.Items));
                    break;
                }
                case (byte)'R':   // REDUCE
                {
                    var args = Pop();
                    var f = Pop();
                    if (f is not Global g || args is not Tuple t) throw Bad($"pickle calls {Describe(f)} at offset {at}; only tensor-rebuilding globals may be called");
                    Push(Call(g, t.Items, at));
                    break;
                }
                case (byte)'b':   // BUILD: OrderedDict's `_metadata` attribute (module versions) is all a state dict sets
                {
                    var state = Pop();
                    if (Top is not Dict) throw Bad($"pickle sets state {Describe(state)} on {Describe(Top)} at offset {at}");
                    break;
                }
                case (byte)'s': { var v = Pop(); var k = Pop(); if (Top is not Dict d) throw Bad($"pickle SETITEM on {Describe(Top)} at offset {at}"); SetItems(d, new List<object?> { k, v }); break; }
                case (byte)'u': { var items = PopMark(); if (Top is not Dict d) throw Bad($"pickle SETITEMS on {Describe(Top)} at offset {at}"); SetItems(d, items); break; }
                case (byte)'a': { var v = Pop(); if (Top is not List<object?> l) throw Bad($"pickle APPEND on {Describe(Top)} at offset {at}"); l.Add(v); break; }
                case (byte)'e': { var items = PopMark(); if (Top is not List<object?> l) throw Bad($"pickle APPENDS on {Describe(Top)} at offset {at}"); l.AddRange(items); break; }
                case (byte)'i' or (byte)'o' or 0x81 or 0x92 or 0x82 or 0x83 or 0x84 or (byte)'P':
                    throw Bad($"pickle opcode 0x{op:x2} at offset {at} constructs arbitrary objects; a state dict never needs it (refused, nothing executed)");
                default:
                    throw Bad($"pickle opcode 0x{op:x2} at offset {at} is not one a torch.save state dict uses");
            }
        }
    }

    object Long(int n)
    {
        var b = Take(n);
        if (n == 0) return 0L;
        var v = new BigInteger(b, isUnsigned: false, isBigEndian: false);
        return v >= long.MinValue && v <= long.MaxValue ? (long)v : v;
    }

    void SetItems(Dict d, List<object?> items)
    {
        if (items.Count % 2 != 0) throw Bad("pickle sets a dict item without a value");
        for (int i = 0; i < items.Count; i += 2)
        {
            // A repeated key replaces the value in Python; in a state dict it would mean two tensors under one name.
            if (items[i] is string s && !d.Names.Add(s)) throw Bad($"pickle stores '{Truncate(s)}' twice");
            d.Items.Add(new(items[i], items[i + 1]));
        }
    }

    Global Resolve(string module, string name)
    {
        string full = module + "." + name;
        if (!Allowed.Contains(full))
            throw Bad($"pickle asks for the global '{full}', which does not rebuild a tensor (only {RebuildTensorV2}, torch.*Storage and {OrderedDict} are allowed): refused, nothing executed");
        return new Global(full);
    }

    object? Call(Global g, object?[] a, int at)
    {
        switch (g.Name)
        {
            case OrderedDict:
                if (a.Length != 0) throw Bad($"pickle builds an OrderedDict from arguments at offset {at}");
                return new Dict();
            case RebuildTensorV2 or RebuildTensor:
            {
                if (a.Length < 4 || a.Length > 7 || a[0] is not TorchStorageRef s) throw Bad($"pickle calls {g.Name} with unexpected arguments at offset {at}");
                long offset = Int(a[1], "storage offset");
                long[] shape = Ints(a[2], "size"), stride = Ints(a[3], "stride");
                if (shape.Length != stride.Length) throw Bad($"pickle tensor at offset {at} has {shape.Length} sizes but {stride.Length} strides");
                if (a.Length >= 6 && a[5] is not (Dict or null)) throw Bad($"pickle tensor at offset {at} has backward hooks");
                return new TorchTensorRef(s, offset, shape, stride);
            }
            case RebuildParameter:
                if (a.Length != 3 || a[0] is not TorchTensorRef t) throw Bad($"pickle calls {g.Name} with unexpected arguments at offset {at}");
                return t;
            default:
                throw Bad($"pickle calls {g.Name} at offset {at}; only tensor-rebuilding globals may be called");
        }
    }

    long Int(object? v, string what) => v is long l && l >= 0 ? l : throw Bad($"pickle tensor {what} {Describe(v)} is not a non-negative integer");

    long[] Ints(object? v, string what)
    {
        if (v is not Tuple t || t.Items.Length > MaxDims) throw Bad($"pickle tensor {what} is not a tuple of at most {MaxDims} integers");
        return t.Items.Select(x => Int(x, what)).ToArray();
    }

    /// <summary>Reads a persistent id's fields as torch.save writes them: ('storage', StorageType, key, location, numel[, view]).</summary>
    public static TorchStorageRef StorageId(string where, object?[] pid, bool legacy)
    {
        if (pid.Length < 5 || pid[0] is not "storage" || pid[1] is not Global g || pid[2] is not string key || pid[3] is not string || pid[4] is not long numel || numel < 0)
            throw new LlmSnpException($"{where}: pickle persistent id is not a ('storage', type, key, location, size) tuple");
        if (!StorageTypes.TryGetValue(g.Name, out var dtype)) throw new LlmSnpException($"{where}: storage type {g.Name} is not a storage");
        if (pid.Length > 6 || (pid.Length == 6 && (!legacy || pid[5] is not null)))
            throw new LlmSnpException($"{where}: storage '{key}' is a view of another storage (pre-1.6 format); load and re-save it with a current torch.save");
        return new TorchStorageRef(key, dtype, numel);
    }
}
