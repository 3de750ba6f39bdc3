#!/usr/bin/env python3
"""Train a small OPT (HF modeling_opt semantics) on the C4 sample, on CPU, and save it in HF layout.

Reference tooling, not part of the product: it makes the bundled trained language model that the
pruning comparisons need (no real OPT checkpoint can be downloaded here).

Inputs are token ids made by the product's own tokenizer, one array per document, bos prepended:
    ./llmsnp tokenize --file C4.jsonl      --jsonl --json train.ids.json
    ./llmsnp tokenize --file HELDOUT.jsonl --jsonl --json heldout.ids.json
Documents equal to a held-out document are dropped from training, so held-out C4 stays unseen.

Runs with Debian's python3-torch (apt install python3-torch libopenblas0-pthread libjemalloc2);
jemalloc with decay off keeps the 0.8 GB logits buffers mapped (glibc re-faults them every step,
half the CPU time):
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \
    /usr/bin/python3 tools/reference/train_opt_tiny.py --train-ids train.ids.json \
        --heldout-ids heldout.ids.json --out DIR --minutes 100
The learning-rate schedule follows wall time when --minutes is given (cosine to 10 % of peak), so
the run ends on time on a shared machine; the log records step, seconds, losses and lr. The saved
checkpoint is the one with the lowest held-out loss. Also writes golden.json: float64 logits of
the saved weights on fixed inputs, which the product's forward must reproduce.
"""
import argparse, json, math, os, random, struct, time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--train-ids", required=True)
p.add_argument("--heldout-ids", required=True)
p.add_argument("--out", required=True)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--ffn", type=int, default=1024)
p.add_argument("--positions", type=int, default=512)
p.add_argument("--vocab", type=int, default=50272)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--lr", type=float, default=1.5e-3)
p.add_argument("--warmup", type=int, default=100)
p.add_argument("--minutes", type=float, default=None, help="wall-time budget; the lr schedule follows it")
p.add_argument("--steps", type=int, default=2000, help="step budget (the schedule follows whichever ends first)")
p.add_argument("--eval-every", type=int, default=50)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

torch.manual_seed(a.seed)
torch.set_num_threads(a.threads)
os.makedirs(a.out, exist_ok=True)

heldout_docs = json.load(open(a.heldout_ids))["ids"]
held = {tuple(d) for d in heldout_docs}
docs = [d for d in json.load(open(a.train_ids))["ids"] if tuple(d) not in held]
random.Random(a.seed).shuffle(docs)
train = torch.tensor([t for d in docs for t in d], dtype=torch.long)
# Held-out C4 as the product evaluates it: documents joined, non-overlapping windows, tail dropped.
val = torch.tensor([t for d in heldout_docs for t in d], dtype=torch.long)
nval = val.numel() // a.positions
val = val[: nval * a.positions].view(nval, a.positions)
print(f"train: {len(docs)} documents, {train.numel()} tokens; held-out: {len(heldout_docs)} documents, {nval} windows")

H, NH, D = a.hidden, a.heads, a.hidden // a.heads


def init_params():
    g = lambda *s: torch.randn(*s) * 0.02
    P = {"model.decoder.embed_tokens.weight": g(a.vocab, H),
         "model.decoder.embed_positions.weight": g(a.positions + 2, H),
         "model.decoder.final_layer_norm.weight": torch.ones(H),
         "model.decoder.final_layer_norm.bias": torch.zeros(H)}
    for i in range(a.layers):
        L = f"model.decoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            P[L + f"self_attn.{n}.weight"] = g(H, H)
            P[L + f"self_attn.{n}.bias"] = torch.zeros(H)
        P[L + "fc1.weight"], P[L + "fc1.bias"] = g(a.ffn, H), torch.zeros(a.ffn)
        P[L + "fc2.weight"], P[L + "fc2.bias"] = g(H, a.ffn), torch.zeros(H)
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            P[L + n + ".weight"], P[L + n + ".bias"] = torch.ones(H), torch.zeros(H)
    return {k: v.requires_grad_() for k, v in P.items()}


def forward(P, ids):
    """HF OPT, pre-LN: learned positions offset by 2, q scaled after its bias, ReLU, tied head."""
    B, T = ids.shape
    x = F.embedding(ids, P["model.decoder.embed_tokens.weight"]) + P["model.decoder.embed_positions.weight"][2: T + 2]
    mask = torch.full((T, T), float("-inf"), dtype=x.dtype).triu(1)
    for i in range(a.layers):
        L = f"model.decoder.layers.{i}."
        lin = lambda h, n: F.linear(h, P[L + n + ".weight"], P[L + n + ".bias"])
        h = F.layer_norm(x, (H,), P[L + "self_attn_layer_norm.weight"], P[L + "self_attn_layer_norm.bias"])
        q = (lin(h, "self_attn.q_proj") * D ** -0.5).view(B, T, NH, D).transpose(1, 2)
        k = lin(h, "self_attn.k_proj").view(B, T, NH, D).transpose(1, 2)
        v = lin(h, "self_attn.v_proj").view(B, T, NH, D).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) + mask, dim=-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, H), "self_attn.out_proj")
        h = F.layer_norm(x, (H,), P[L + "final_layer_norm.weight"], P[L + "final_layer_norm.bias"])
        x = x + lin(F.relu(lin(h, "fc1")), "fc2")
    x = F.layer_norm(x, (H,), P["model.decoder.final_layer_norm.weight"], P["model.decoder.final_layer_norm.bias"])
    return x @ P["model.decoder.embed_tokens.weight"].t()


def nll(P, ids):
    logits = forward(P, ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(P):
    # Mean next-token NLL over all held-out windows, as `llmsnp eval ppl` computes it.
    tot, n = 0.0, 0
    for s in range(0, nval, 8):
        w = val[s: s + 8]
        logits = forward(P, w)[:, :-1]
        tot += F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum").item()
        n += w[:, 1:].numel()
    return tot / n


def save_safetensors(path, tensors):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        b = tensors[name].detach().contiguous().float().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


P = init_params()
decay = [v for k, v in P.items() if v.dim() == 2]
no_decay = [v for k, v in P.items() if v.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=a.lr, betas=(0.9, 0.95))
gen = torch.Generator().manual_seed(a.seed)
log, best, t0, step = [], float("inf"), time.time(), 0
budget = a.minutes * 60 if a.minutes else None


def progress():
    p_steps = step / a.steps
    return max(p_steps, (time.time() - t0) / budget) if budget else p_steps


while progress() < 1.0:
    frac = progress()
    lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    for g in opt.param_groups:
        g["lr"] = lr
    starts = torch.randint(0, train.numel() - a.positions - 1, (a.batch,), generator=gen)
    ids = torch.stack([train[s: s + a.positions + 1] for s in starts.tolist()])
    # The window is positions + 1 tokens: inputs are the first `positions`, as at evaluation.
    loss = nll(P, ids)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(P.values()), 1.0)
    opt.step()
    step += 1
    if step % a.eval_every == 0 or progress() >= 1.0:
        v = heldout_loss(P)
        entry = {"step": step, "seconds": round(time.time() - t0), "tokens": step * a.batch * a.positions,
                 "train_loss": round(loss.item(), 4), "heldout_loss": round(v, 4), "lr": lr}
        log.append(entry)
        print(json.dumps(entry), flush=True)
        if v < best:
            best = v
            save_safetensors(os.path.join(a.out, "model.safetensors"), P)
            entry["saved"] = True
        json.dump(log, open(os.path.join(a.out, "training-log.json"), "w"), indent=1)

config = {
    "model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": a.vocab, "hidden_size": H,
    "num_hidden_layers": a.layers, "num_attention_heads": NH, "ffn_dim": a.ffn,
    "max_position_embeddings": a.positions, "do_layer_norm_before": True, "word_embed_proj_dim": H,
    "activation_function": "relu", "enable_bias": True, "layer_norm_elementwise_affine": True,
    "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2, "dropout": 0.0, "attention_dropout": 0.0,
    "torch_dtype": "float32", "tie_word_embeddings": True}
json.dump(config, open(os.path.join(a.out, "config.json"), "w"), indent=2)

# Golden logits of the saved (best) weights in float64, on the first 24 tokens of three held-out
# documents; a fixed slice of the vocabulary keeps the file small, the NLL covers all of it.
with open(os.path.join(a.out, "model.safetensors"), "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    hdr, data = json.loads(f.read(n)), f.read()
Pd = {k: torch.frombuffer(bytearray(data[v["data_offsets"][0]: v["data_offsets"][1]]), dtype=torch.float32)
      .view(v["shape"]).double() for k, v in hdr.items() if k != "__metadata__"}
inputs = [d[:24] for d in heldout_docs[:3]]
cols = list(range(0, a.vocab, 997))
with torch.no_grad():
    lg = [forward(Pd, torch.tensor([x]))[0] for x in inputs]
golden = {
    "about": "float64 logits of model.safetensors (HF OPT semantics), one forward per sequence from position 0; "
             "logits restricted to vocabulary columns `columns`; nll = mean next-token NLL over the full vocabulary",
    "input_ids": inputs, "columns": cols,
    "logits": [[[round(v, 7) for v in row[cols].tolist()] for row in l] for l in lg],
    "nll": [F.cross_entropy(l[:-1], torch.tensor(x[1:])).item() for l, x in zip(lg, inputs)]}
json.dump(golden, open(os.path.join(a.out, "golden.json"), "w"))
print(f"done: best held-out loss {best:.4f} (ppl {math.exp(best):.2f}) after {step} steps, {time.time() - t0:.0f} s")
