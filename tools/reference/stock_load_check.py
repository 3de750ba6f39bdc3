#!/usr/bin/env python3
"""Do uniform prunes of the three bundled models load in stock `transformers` at their pruned size, with LlmSnp's logits?

Prepared check, not in CI: it needs PyTorch and `transformers` (>= 4.48: older Qwen2/Mistral classes ignore an
explicit head_dim; LlamaForCausalLM reads head_dim since 4.45), which the CI machine does not have. NOT RUN YET:
the session that wrote it had no device machine and no PyTorch; run it where both exist and record the output.

For each bundled model it
  1. prunes with uniform widths through the CLI (same options every time, small calibration):
       ./llmsnp prune --model models/opt-tiny-c4-v2 --out OUT/opt   --ratio 0.25 --uniform --targets mlp --calib c4 --calib-samples 8 --calib-seqlen 128
       ./llmsnp prune --model models/vit-tiny       --out OUT/vit   --ratio 0.34 --uniform --calib eval/data/imagenet-val --calib-samples 8
       ./llmsnp prune --model models/stories260k    --out OUT/llama --ratio 0.25 --uniform --calib tinystories --calib-samples 8 --calib-seqlen 128
     (OPT prunes the MLP only: stock OPT's attention width is hidden_size, so an OPT with heads removed is not
     stock-loadable; its --export-padded copy is, and is checked as OUT/opt-heads/padded);
  2. writes LlmSnp's float64 logits for a fixed input with `llmsnp eval logits` (token ids for the language models,
     for ViT the pattern image sin(0.05 w + 0.07 h + 1.3 c), already normalised, so no image decoder is involved):
       ./llmsnp eval logits --model OUT/opt --ids 2,31414,6,127,2335,16,11962 --dtype float64 --json OUT/opt.logits.json
  3. loads OUT/<name> with from_pretrained (OPTForCausalLM, ViTForImageClassification, LlamaForCausalLM,
     MixtralForCausalLM) in float64,
     strictly: any missing, unexpected or mis-shaped tensor is a failure (transformers reports them in loading_info),
  4. compares the logits; prints one line per model and exits non-zero on any failure.

    python3 tools/reference/stock_load_check.py [--out DIR] [--tol 1e-6]

Run it from the repository root after ./scripts/setup.sh.
"""
import argparse, json, math, os, shutil, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLMSNP = os.path.join(ROOT, "llmsnp")
IDS = {"opt": [2, 31414, 6, 127, 2335, 16, 11962], "llama": [1, 403, 407, 261, 378, 395, 269, 411], "mixtral": [1, 403, 407, 261, 378, 395, 269, 411]}

PRUNES = {
    "opt": ["--model", "models/opt-tiny-c4-v2", "--ratio", "0.25", "--uniform", "--targets", "mlp", "--calib", "c4", "--calib-samples", "8", "--calib-seqlen", "128"],
    "opt-heads": ["--model", "models/opt-tiny-c4-v2", "--ratio", "0.25", "--uniform", "--calib", "c4", "--calib-samples", "8", "--calib-seqlen", "128", "--export-padded"],
    "vit": ["--model", "models/vit-tiny", "--ratio", "0.34", "--uniform", "--calib", "eval/data/imagenet-val", "--calib-samples", "8"],
    "llama": ["--model", "models/stories260k", "--ratio", "0.25", "--uniform", "--calib", "tinystories", "--calib-samples", "8", "--calib-seqlen", "128"],
    # The random Mixtral golden fixture with stories260K's tokenizer (same 512-token vocabulary), a quarter of the experts
    # removed and a quarter of each kept expert's neurons: MixtralForCausalLM reads the hub's per-expert names.
    "mixtral": ["--model", "fixture:golden-families/mixtral", "--ratio", "0.25", "--uniform", "--experts-keep", "3", "--calib", "tinystories", "--calib-samples", "8", "--calib-seqlen", "128"],
}


def sh(args):
    r = subprocess.run([LLMSNP] + args, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"llmsnp {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return r.stdout


def stock_logits(kind, model_dir):
    import torch
    from transformers import LlamaForCausalLM, MixtralForCausalLM, OPTForCausalLM, ViTForImageClassification
    cls = {"opt": OPTForCausalLM, "vit": ViTForImageClassification, "llama": LlamaForCausalLM, "mixtral": MixtralForCausalLM}[kind]
    model, info = cls.from_pretrained(model_dir, torch_dtype=torch.float64, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"not a clean stock load: {bad}")
    model.eval()
    with torch.no_grad():
        if kind == "vit":
            c = model.config
            ch = torch.arange(c.num_channels, dtype=torch.float64).reshape(-1, 1, 1)
            h = torch.arange(c.image_size, dtype=torch.float64).reshape(1, -1, 1)
            w = torch.arange(c.image_size, dtype=torch.float64).reshape(1, 1, -1)
            # LlmSnp makes the pattern in float32 (as the golden test does): round the same way.
            x = torch.sin(0.05 * w + 0.07 * h + 1.3 * ch).float().double().unsqueeze(0)
            return model(pixel_values=x).logits[0].tolist()
        return model(torch.tensor([IDS[kind]])).logits[0].tolist()


def max_abs(a, b):
    if isinstance(a[0], list):
        return max(max_abs(x, y) for x, y in zip(a, b))
    return max(abs(x - y) for x, y in zip(a, b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="directory for the prunes (default: a temporary one)")
    ap.add_argument("--tol", type=float, default=1e-6, help="max |Δlogit| allowed (both sides float64)")
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="stock-load-")
    failures = 0
    for name, args in PRUNES.items():
        d = os.path.join(out, name)
        if args[1].startswith("fixture:"):
            # A test fixture has no tokenizer: a copy with stories260K's, for the tinystories calibration.
            src = os.path.join(out, name + "-source")
            shutil.copytree(os.path.join(ROOT, "tests", "fixtures", args[1][len("fixture:"):]), src, dirs_exist_ok=True)
            shutil.copy(os.path.join(ROOT, "models", "stories260k", "tokenizer.model"), src)
            args = [args[0], src] + args[2:]
        report = json.loads(sh(["prune", "--out", d, "--force"] + args))
        kind = name.split("-")[0]
        target = os.path.join(d, "padded") if name == "opt-heads" else d
        if name == "opt-heads":
            assert report["stock_loadable"] is False, "an OPT with heads removed must say it is not stock-loadable"
        elif not report["stock_loadable"]:
            print(f"FAIL {name}: LlmSnp says not stock-loadable: {report['stock_loadable_why_not']}")
            failures += 1
            continue
        ids = [] if kind == "vit" else ["--ids", ",".join(map(str, IDS[kind]))]
        mine = json.loads(sh(["eval", "logits", "--model", target, "--dtype", "float64"] + ids))["logits"]
        try:
            theirs = stock_logits(kind, target)
        except Exception as e:  # a failed stock load is the result being checked, not a crash of the script
            print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0]}")
            failures += 1
            continue
        err = max_abs(mine, theirs)
        ok = err <= a.tol and not math.isnan(err)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {target} loads in stock transformers; max |Δlogit| = {err:.3g} (tol {a.tol:g}); "
              f"params {report['params_before']} → {report['params_after']}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
