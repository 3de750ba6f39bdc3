#!/usr/bin/env python3
"""Do Gemma 2 prunes load in stock `transformers` (Gemma2ForCausalLM) with LlmSnp's logits?

Stock transformers 4.48 (../shared/tools/hfenv) knows gemma2, not qwen3 or gemma3_text (FamilyPruningTests derive
those classes' shapes instead). From the repository root after ./scripts/setup.sh, with hfenv on PYTHONPATH:

    /usr/bin/python3 tools/reference/stock_load_gemma2.py OUT_DIR

It copies the golden-families gemma2 fixture with the gemma-spm tokenizer, prunes it through the CLI
  (a) uniform, --ratio 0.5 (default lstsq: o_proj gains a bias, attention_bias true),
  (b) per layer, --budget 0.4 with --export-padded (its padded copy has the original widths),
writes LlmSnp's float64 logits (`llmsnp eval logits`), loads (a) and (b)/padded with from_pretrained(float64, eager)
strictly (any missing / unexpected / mis-shaped tensor fails), and compares. Stock runs its RMSNorm, RoPE tables and
softmax in float32 even in a float64 model: agreement is ~1e-6, not 1e-12.

Recorded (2026-12-05): (a) loads with no loading_info entry, 189312 parameters = params_after, max |Δlogit| 6.5e-7;
(b) padded loads likewise (327936 parameters: the original widths and the added biases), max |Δlogit| 5.1e-7.
"""
import json, os, shutil, subprocess, sys

import torch
from transformers import Gemma2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IDS = "2,100,62,397,432,338,409,391,11,252,42,52"
out = sys.argv[1]
src = os.path.join(out, "src")
shutil.rmtree(out, ignore_errors=True)
os.makedirs(src)
for f in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(ROOT, "tests/fixtures/golden-families/gemma2", f), src)
for f in ("tokenizer.model", "tokenizer_config.json"):
    shutil.copy(os.path.join(ROOT, "tests/fixtures/tokenizers/gemma-spm", f), src)
calib = ["--calib", "tinystories", "--calib-samples", "8", "--calib-seqlen", "64"]


def llmsnp(*args):
    subprocess.run([os.path.join(ROOT, "llmsnp"), *args], check=True, capture_output=True)


llmsnp("prune", "--model", src, "--out", os.path.join(out, "uniform"), "--ratio", "0.5", "--uniform", *calib)
llmsnp("prune", "--model", src, "--out", os.path.join(out, "budget"), "--budget", "0.4", "--export-padded", *calib)
failed = False
for name, d in (("uniform", os.path.join(out, "uniform")), ("budget/padded", os.path.join(out, "budget", "padded"))):
    llmsnp("eval", "logits", "--model", d, "--ids", IDS, "--dtype", "f64", "--json", d + ".logits.json")
    want = json.load(open(d + ".logits.json"))
    m, info = Gemma2ForCausalLM.from_pretrained(d, torch_dtype=torch.float64, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    with torch.no_grad():
        got = m(torch.tensor([want["input"]]), use_cache=False).logits[0].double()
    diff = (got - torch.tensor(want["logits"], dtype=torch.float64)).abs().max().item()
    ok = not bad and diff < 1e-5
    failed |= not ok
    print(f"{name}: {'ok' if ok else 'FAIL'} loading_info {bad or 'clean'}, {sum(p.numel() for p in m.parameters())} parameters, max |stock - llmsnp| {diff:.2e}")
sys.exit(1 if failed else 0)
