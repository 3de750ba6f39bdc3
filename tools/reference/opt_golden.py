#!/usr/bin/env python3
"""Float64 reference logits of a pre-LN, tied-head OPT checkpoint (HF layout, F32 or F16), in NumPy.

Reference tooling, independent of the product and of PyTorch: it reads model.safetensors itself
and implements the HF modeling_opt forward (learned positions offset by 2, q scaled after its
bias, causal softmax, ReLU, final LayerNorm, head tied to the token embedding) in float64 from the
weights as stored. Writes golden.json: the input ids, logits at a fixed slice of the vocabulary
(every 997th id, to keep the file small) and each sequence's mean next-token NLL over the full
vocabulary.

    /usr/bin/python3 tools/reference/opt_golden.py MODEL_DIR IDS_JSON OUT_JSON
IDS_JSON holds {"input_ids": [[...], ...]} (bos first).

With --ppl, a reference perplexity instead (the product's protocol: non-overlapping windows of
SEQLEN tokens from the start of the id stream, tail dropped, mean next-token NLL over all windows):
    /usr/bin/python3 tools/reference/opt_golden.py MODEL_DIR --ppl IDS_JSON SEQLEN
IDS_JSON is `llmsnp tokenize --json` output ({"ids": [...]}).
"""
import json, struct, sys

import numpy as np

model_dir = sys.argv[1]
cfg = json.load(open(f"{model_dir}/config.json"))
assert cfg["do_layer_norm_before"] and cfg.get("tie_word_embeddings", True), "pre-LN, tied head only"
with open(f"{model_dir}/model.safetensors", "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header, data = json.loads(f.read(n)), f.read()
DT = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
W = {k: np.frombuffer(data[v["data_offsets"][0]: v["data_offsets"][1]], dtype=DT[v["dtype"]]).reshape(v["shape"]).astype(np.float64)
     for k, v in header.items() if k != "__metadata__"}
P = "model.decoder."
H, NH = cfg["hidden_size"], cfg["num_attention_heads"]
D = H // NH


def ln(x, name):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5) * W[name + ".weight"] + W[name + ".bias"]


def lin(x, name):
    return x @ W[name + ".weight"].T + W[name + ".bias"]


def forward(ids):
    T = len(ids)
    x = W[P + "embed_tokens.weight"][ids] + W[P + "embed_positions.weight"][2: T + 2]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        L = f"{P}layers.{i}."
        h = ln(x, L + "self_attn_layer_norm")
        q = (lin(h, L + "self_attn.q_proj") * D ** -0.5).reshape(T, NH, D).transpose(1, 0, 2)
        k = lin(h, L + "self_attn.k_proj").reshape(T, NH, D).transpose(1, 0, 2)
        v = lin(h, L + "self_attn.v_proj").reshape(T, NH, D).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + lin(a.transpose(1, 0, 2).reshape(T, H), L + "self_attn.out_proj")
        h = ln(x, L + "final_layer_norm")
        x = x + lin(np.maximum(lin(h, L + "fc1"), 0.0), L + "fc2")
    return ln(x, P + "final_layer_norm") @ W[P + "embed_tokens.weight"].T


if sys.argv[2] == "--ppl":
    ids, seqlen = json.load(open(sys.argv[3]))["ids"], int(sys.argv[4])
    total, n = 0.0, 0
    for w in range(len(ids) // seqlen):
        x = np.array(ids[w * seqlen: (w + 1) * seqlen])
        z = forward(x)[:-1]
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        total -= logp[np.arange(seqlen - 1), x[1:]].sum()
        n += seqlen - 1
    print(json.dumps({"model": model_dir, "ids": sys.argv[3], "windows": len(ids) // seqlen, "seqlen": seqlen,
                      "perplexity": float(np.exp(total / n))}))
    sys.exit(0)

ids_path, out_path = sys.argv[2:4]
inputs = json.load(open(ids_path))["input_ids"]
cols = list(range(0, cfg["vocab_size"], 997))
out = {"about": "float64 logits of model.safetensors as stored (HF OPT semantics, NumPy), one forward per sequence "
                "from position 0; logits at vocabulary ids `columns`; nll = mean next-token NLL over the full vocabulary",
       "input_ids": inputs, "columns": cols, "logits": [], "nll": []}
for ids in inputs:
    lg = forward(np.array(ids))
    out["logits"].append([[round(float(v), 9) for v in row[cols]] for row in lg])
    z = lg[:-1] - lg[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    out["nll"].append(float(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))
json.dump(out, open(out_path, "w"))
print(f"{out_path}: {len(inputs)} sequences, nll {['%.6f' % v for v in out['nll']]}")
