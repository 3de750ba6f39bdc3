#!/usr/bin/env python3
"""Small tokenizers in the formats of Gemma (SentencePiece tokenizer.model) and Qwen3 (byte-level BPE
tokenizer.json), trained on TinyStories, with reference ids from independent implementations.

- gemma-spm/: trained with the sentencepiece library (Debian python3-sentencepiece 0.1.97) using Gemma's settings:
  BPE, byte fallback, no dummy prefix, whitespace kept as is, identity normaliser, digits split, user-defined
  symbols <start_of_turn> / <end_of_turn>, ids pad 0, eos 1, bos 2, unk 3, 512 pieces. expected.json: the ids
  sentencepiece itself gives each text, with bos prepended (Gemma's tokenizer_config add_bos_token).
- qwen-bpe/: byte-level BPE with Qwen2/Qwen3's pre-tokenizer (NFC, the Split regex below, ByteLevel without its own
  regex), vocabulary = the 256 byte symbols + merges learned here greedily (most frequent pair first) + Qwen's added
  tokens, 512 ids. expected.json: the ids this script's own BPE encoder gives (split on added tokens, NFC, regex,
  bytes → GPT-2 symbols, merges applied lowest rank first), no bos (Qwen prepends none).

    /usr/bin/python3 tools/reference/family_tokenizers.py REPO_ROOT
"""
import json, os, sys, tempfile, unicodedata

import regex
import sentencepiece as spm

root = sys.argv[1]
corpus = open(os.path.join(root, "eval/data/tinystories/calib.txt"), encoding="utf-8").read()
story = open(os.path.join(root, "eval/data/tinystories/eval.txt"), encoding="utf-8").read()[:3000]
TEXTS = [
    story,
    "Hello  world!\n\n  Numbers: 12345, 3.14; naïve émigré 日本語 — don't 'LL stop.\tTabs\r\nand   spaces   ",
    "<start_of_turn>user\nTell me a story.<end_of_turn>\n<start_of_turn>model\nOnce upon a time<end_of_turn>",
    "<think>\nLily wants the red ball.\n</think>\n\nShe said, \"Can I play?\" 42 dogs!",
]
out = os.path.join(root, "tests/fixtures/tokenizers")

# ---------------------------------------------------------------- Gemma-style SentencePiece
d = os.path.join(out, "gemma-spm")
os.makedirs(d, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    txt = os.path.join(tmp, "corpus.txt")
    open(txt, "w", encoding="utf-8").write(corpus)
    spm.SentencePieceTrainer.train(
        input=txt, model_prefix=os.path.join(tmp, "m"), model_type="bpe", vocab_size=512, byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        character_coverage=1.0, max_sentence_length=100000, minloglevel=2)
    model = open(os.path.join(tmp, "m.model"), "rb").read()
open(os.path.join(d, "tokenizer.model"), "wb").write(model)
json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
           "unk_token": "<unk>", "tokenizer_class": "GemmaTokenizer"}, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)
sp = spm.SentencePieceProcessor(model_proto=model)
assert sp.get_piece_size() == 512
json.dump({"about": "sentencepiece 0.1.97 EncodeAsIds of each text, bos (2) prepended",
           "texts": TEXTS, "ids": [[2] + sp.encode(t) for t in TEXTS]},
          open(os.path.join(d, "expected.json"), "w"), ensure_ascii=False)

# ---------------------------------------------------------------- Qwen-style byte-level BPE
QWEN_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False), ("</think>", False)]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


B2U = bytes_to_unicode()
pat = regex.compile(QWEN_REGEX)


def words(text):
    return ["".join(B2U[b] for b in w.encode("utf-8")) for w in pat.findall(unicodedata.normalize("NFC", text))]


counts = {}
for w in words(corpus):
    counts[w] = counts.get(w, 0) + 1
seqs = {w: list(w) for w in counts}
vocab = {B2U[b]: i for i, b in enumerate(sorted(B2U))}   # the 256 byte symbols, in byte order
merges = []
n_merges = 512 - 256 - len(ADDED)
while len(merges) < n_merges:
    pairs = {}
    for w, s in seqs.items():
        for a, b in zip(s, s[1:]):
            pairs[(a, b)] = pairs.get((a, b), 0) + counts[w]
    (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
    assert a + b not in vocab, f"merge {a!r} {b!r} repeats a symbol"
    merges.append((a, b))
    vocab[a + b] = len(vocab)
    for w, s in seqs.items():
        i, r = 0, []
        while i < len(s):
            if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                r.append(a + b)
                i += 2
            else:
                r.append(s[i])
                i += 1
        seqs[w] = r
added = [{"id": len(vocab) + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": sp_}
         for k, (t, sp_) in enumerate(ADDED)]
rank = {m: r for r, m in enumerate(merges)}


def bpe(word):
    s = list(word)
    while len(s) > 1:
        best = min(((rank.get((s[i], s[i + 1]), 1 << 30), i) for i in range(len(s) - 1)))
        if best[0] == 1 << 30:
            break
        i = best[1]
        s = s[:i] + [s[i] + s[i + 1]] + s[i + 2:]
    return [vocab[t] for t in s]


def encode(text):
    ids, rest = [], text
    split = regex.compile("(" + "|".join(regex.escape(a["content"]) for a in added) + ")")
    for part in split.split(rest):
        if part == "":
            continue
        hit = [a["id"] for a in added if a["content"] == part]
        if hit:
            ids += hit
        else:
            for w in words(part):
                ids += bpe(w)
    return ids


tok = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
    "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
              "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": vocab,
              "merges": [f"{a} {b}" for a, b in merges]},
}
d = os.path.join(out, "qwen-bpe")
os.makedirs(d, exist_ok=True)
json.dump(tok, open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8"), ensure_ascii=False)
json.dump({"add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "tokenizer_class": "Qwen2Tokenizer"}, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)
json.dump({"about": "this script's byte-level BPE encoder (added tokens split first, NFC, Qwen2 regex, merges by rank), no bos",
           "texts": TEXTS, "ids": [encode(t) for t in TEXTS]},
          open(os.path.join(d, "expected.json"), "w"), ensure_ascii=False)
print("ok", len(vocab) + len(added), "ids;", len(merges), "merges")
