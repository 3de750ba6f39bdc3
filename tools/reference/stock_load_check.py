#!/usr/bin/env python3
"""Do uniform prunes load in stock `transformers` at their pruned size, cleanly, with LlmSnp's logits?

Needs PyTorch and `transformers` >= 4.48 (older Qwen2/Mistral classes ignore an explicit head_dim); the CI machine has
neither, so this is run by hand and its record committed (eval/results/stock-transformers-loads-pruned.json,
docs/results.md "Stock transformers"). On Debian 12: python3-torch (PyTorch 1.13) and a transformers source tree on
PYTHONPATH (transformers 4.48 is the newest that runs on torch 1.13).

For each case it
  1. prunes with uniform widths through the CLI, writing only under --out (fixtures are copied there first):
       ./llmsnp prune --model models/opt-tiny-c4-v2 --out OUT/opt-mlp --ratio 0.25 --uniform --targets mlp --calib c4 ...
  2. asks LlmSnp for its float64 logits on a fixed input (token ids; for ViT the pattern image
     sin(0.05 w + 0.07 h + 1.3 c), already normalised, so no image decoder is involved):
       ./llmsnp eval logits --model OUT/opt-mlp --ids 2,31414,6,127,2335,16,11962 --dtype float64
  3. loads the directory with from_pretrained in float64 and fails the case on any missing, unexpected or mismatched
     tensor (loading_info), any warning logged or raised while loading, a stored tensor whose shape differs from the
     built parameter, or a built parameter count other than what is stored (the report's params_after for the prune
     itself; for a padded copy the original count, plus the zero biases a stock class with attention_bias / mlp_bias
     carries once the reconstruction gave o_proj / down_proj theirs);
  4. compares the logits. Stock LLaMA-family classes are not float64 throughout even in a float64 model: they compute
     the RoPE tables, RMSNorm and the eager attention softmax in float32. So there are two verdicts: stock as it runs,
     within --tol-float32-steps (1e-5), and stock with those three steps promoted to float64, within --tol (1e-9).
     OPT and ViT are float64 throughout and must agree within --tol.
The negative control (an OPT with heads removed, not padded, which LlmSnp reports as not stock-loadable) must fail to
load; if it loads, the check is blind and the script fails. Prints one line per case, exits non-zero on any failure.

    python3 tools/reference/stock_load_check.py [--out DIR] [--cases a,b] [--json RECORD.json]

Run it from anywhere after ./scripts/setup.sh; nothing is written under the repository.
"""
import argparse, contextlib, json, logging, math, os, platform, shutil, struct, subprocess, sys, tempfile, time, types, warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLMSNP = os.path.join(ROOT, "llmsnp")
IDS = {"opt": [2, 31414, 6, 127, 2335, 16, 11962], "llama": [1, 403, 407, 261, 378, 395, 269, 411]}
C4 = ["--calib", "c4", "--calib-samples", "8", "--calib-seqlen", "128"]
STORIES = ["--calib", "tinystories", "--calib-samples", "8", "--calib-seqlen", "128"]
IMAGES = ["--calib", "eval/data/imagenet-val", "--calib-samples", "8"]
U25, U50 = ["--ratio", "0.25", "--uniform"], ["--ratio", "0.5", "--uniform"]

# name: (stock class, source (repository path, or fixture:NAME under tests/fixtures/golden-llama), prune options,
#        what to load: "" = the prune itself, "padded" = its --export-padded copy, what it shows)
CASES = {
    "opt-mlp": ("OPTForCausalLM", "models/opt-tiny-c4-v2", U25 + ["--targets", "mlp"] + C4, "", "OPT, MLP 1024 → 768 (ffn_dim)"),
    "opt-mlp-lstsq-bias": ("OPTForCausalLM", "models/opt-tiny-c4-v2", U25 + ["--targets", "mlp", "--reconstruct", "lstsq-bias"] + C4, "", "OPT, MLP, the mean term folded into fc2's bias"),
    "opt-heads-padded": ("OPTForCausalLM", "models/opt-tiny-c4-v2", U25 + C4 + ["--export-padded"], "padded", "OPT, 8 → 6 heads + MLP: the zero-padded copy"),
    "vit": ("ViTForImageClassification", "models/vit-tiny", ["--ratio", "0.34", "--uniform"] + IMAGES, "", "ViT, 3 → 2 heads (pruned_heads) + MLP"),
    "stories260k": ("LlamaForCausalLM", "models/stories260k", U25 + STORIES, "", "Llama, K/V groups 4 → 3 + MLP, lstsq (gains o_proj/down_proj biases: attention_bias, mlp_bias)"),
    "stories260k-mlp": ("LlamaForCausalLM", "models/stories260k", U25 + ["--targets", "mlp"] + STORIES, "", "Llama, MLP only (172 → 129)"),
    "stories260k-kv-half": ("LlamaForCausalLM", "models/stories260k", U50 + ["--targets", "heads"] + STORIES, "", "Llama, K/V groups 4 → 2"),
    "stories260k-budget": ("LlamaForCausalLM", "models/stories260k", ["--budget", "0.3", "--uniform"] + STORIES, "", "Llama, --budget 0.3 --uniform"),
    "stories260k-lstsq-nobias": ("LlamaForCausalLM", "models/stories260k", U25 + ["--reconstruct", "lstsq-nobias"] + STORIES, "", "Llama, lstsq-nobias (no bias added)"),
    "stories260k-padded": ("LlamaForCausalLM", "models/stories260k", U25 + STORIES + ["--export-padded"], "padded", "Llama, the zero-padded copy"),
    "llama-gqa-untied": ("LlamaForCausalLM", "fixture:llama-gqa-untied", U50 + ["--reconstruct", "lstsq-bias"] + STORIES, "", "Llama, GQA 8:2 → 4:1, head_dim 12, untied head, lstsq-bias"),
    "mistral": ("MistralForCausalLM", "fixture:mistral-f16", U50 + STORIES, "", "Mistral F16, K/V 2 → 1: lstsq falls back to no bias (the stock class has none)"),
    "qwen2": ("Qwen2ForCausalLM", "fixture:qwen2-bias-tied", U25 + STORIES, "", "Qwen2, 4 → 3 heads: explicit head_dim 16, q/k/v biases, tied head"),
    "qwen2-padded": ("Qwen2ForCausalLM", "fixture:qwen2-bias-tied", U25 + STORIES + ["--export-padded"], "padded", "Qwen2, the zero-padded copy"),
    # The random Mixtral fixture (per-expert hub names), a quarter of the experts removed and a quarter of each kept expert's neurons.
    "mixtral-experts": ("MixtralForCausalLM", "fixture:golden-families/mixtral", U25 + ["--experts-keep", "3"] + STORIES, "", "Mixtral, experts 4 → 3 (router rows removed) + 25 % inside each kept expert"),
    # Negative control: LlmSnp says this one is not stock-loadable (OPT's attention is hidden → hidden whatever the heads).
    "neg-opt-heads-unpadded": ("OPTForCausalLM", "models/opt-tiny-c4-v2", U25 + C4, "", "OPT with heads removed, not padded: must NOT load"),
}


def llmsnp(args):
    r = subprocess.run([LLMSNP] + args, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llmsnp {' '.join(args)}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout)


def source_dir(src, out):
    """A repository model, or a copy of a golden LLaMA fixture with stories260K's tokenizer (the fixtures share its
    512-token vocabulary and carry none) so that tinystories text can calibrate it."""
    if not src.startswith("fixture:"):
        return src
    name = src.split(":", 1)[1]
    dst = os.path.join(out, "fixtures", name)
    if not os.path.isdir(dst):
        # NAME under golden-llama, or a path under tests/fixtures (golden-families/mixtral).
        shutil.copytree(os.path.join(ROOT, "tests", "fixtures", *(name.split("/") if "/" in name else ["golden-llama", name])), dst)
        for f in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(os.path.join(ROOT, "models", "stories260k", f), dst)
    return dst


def stored_shapes(d):
    shapes = {}
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors"):
            with open(os.path.join(d, fn), "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


@contextlib.contextmanager
def captured_warnings():
    """Everything transformers logs at WARNING or above, and every Python warning, while the block runs."""
    got = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(f"{record.name}: {record.getMessage().splitlines()[0]}")

    handler, log = Keep(logging.WARNING), logging.getLogger("transformers")
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            yield got
        got += [f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in ws]
    finally:
        log.removeHandler(handler)


@contextlib.contextmanager
def float64_steps(model):
    """Stock's own float32 steps in float64, on this model instance only: the RoPE tables (computed in float32 from a
    float32 inv_freq, "Force float32"), RMSNorm (which casts its input to float32) and the eager attention softmax
    (dtype=torch.float32). Default rope type only (no scaling), which is all the cases here use."""
    import torch
    import torch.nn.functional as F

    def norm(self, x):
        x64 = x.to(torch.float64)
        return (self.weight.to(torch.float64) * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))).to(x.dtype)

    def rope(self, x, position_ids):
        c = model.config
        assert not getattr(c, "rope_scaling", None), "float64_steps handles the default rope type only"
        dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        inv = 1.0 / (float(c.rope_theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids.to(torch.float64)[:, :, None] * inv[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    saved, softmax = [], F.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=torch.float64 if dtype == torch.float32 and x.dtype == torch.float64 else dtype)

    for m in model.modules():
        kind = type(m).__name__
        if kind.endswith("RMSNorm") or kind.endswith("RotaryEmbedding"):
            saved.append((m, m.forward))
            m.forward = types.MethodType(norm if kind.endswith("RMSNorm") else rope, m)
    F.softmax = softmax64
    try:
        yield len(saved)
    finally:
        F.softmax = softmax
        for m, f in saved:
            m.forward = f


def stock_load(cls_name, d, **kw):
    import torch, transformers
    with captured_warnings() as ws:
        model, info = getattr(transformers, cls_name).from_pretrained(d, torch_dtype=torch.float64, output_loading_info=True, **kw)
    return model.eval(), info, ws


def forward(model, ids):
    import torch
    with torch.no_grad():
        if ids is None:
            c = model.config
            ch = torch.arange(c.num_channels, dtype=torch.float64).reshape(-1, 1, 1)
            h = torch.arange(c.image_size, dtype=torch.float64).reshape(1, -1, 1)
            w = torch.arange(c.image_size, dtype=torch.float64).reshape(1, 1, -1)
            # LlmSnp makes the pattern in float32 (as its golden test does): round the same way.
            return model(pixel_values=torch.sin(0.05 * w + 0.07 * h + 1.3 * ch).float().double().unsqueeze(0)).logits[0]
        inp = torch.tensor([ids])
        if hasattr(model, "lm_head") and hasattr(model, "model"):
            # transformers < 4.46 casts LLaMA-family logits to float32: take the float64 head output itself.
            return model.lm_head(model.model(inp)[0])[0]
        return model(inp).logits[0]


def check(name, a, out):
    import torch
    cls_name, src, prune, sub, shows = CASES[name]
    res = {"case": name, "shows": shows, "class": cls_name, "prune": " ".join(prune)}
    model_dir = source_dir(src, out)
    d = os.path.join(out, name)
    report = llmsnp(["prune", "--model", model_dir, "--out", d, "--force"] + prune)
    target = os.path.join(d, sub) if sub else d
    res.update(params_before=report["params_before"], params_after=report["params_after"], stock_loadable=report["stock_loadable"],
               reconstruct_used=sorted({l["reconstruct_used"] for l in report["layers"] if l.get("reconstruct_used")}))
    kind = "vit" if cls_name.startswith("ViT") else "opt" if cls_name.startswith("OPT") else "llama"
    ids = IDS.get(kind)
    if name.startswith("neg-"):
        if report["stock_loadable"]:
            return res, ["LlmSnp calls the negative control stock-loadable"]
        try:
            stock_load(cls_name, target)
            return res, ["the negative control loaded: the check is blind"]
        except Exception as e:
            res["load_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        # The warning capture must see what a lenient load of the same directory complains about.
        import transformers
        transformers.logging.disable_default_handler()   # captured, not printed
        try:
            _, _, ws = stock_load(cls_name, target, ignore_mismatched_sizes=True)
        finally:
            transformers.logging.enable_default_handler()
        res["lenient_load_warnings"] = ws[:3]
        return res, [] if ws else ["a lenient load of the negative control logged no warning: the warning capture is blind"]
    if not sub and not report["stock_loadable"]:
        return res, [f"LlmSnp says not stock-loadable: {report['stock_loadable_why_not']}"]
    mine = llmsnp(["eval", "logits", "--model", target, "--dtype", "float64"] + (["--ids", ",".join(map(str, ids))] if ids else []))
    model, info, ws = stock_load(cls_name, target)
    problems = []
    if any(info.values()):
        problems.append(f"loading_info {({k: v for k, v in info.items() if v})}")
    if ws:
        problems.append(f"load warnings {ws}")
    built = dict(model.state_dict())
    shapes = [f"{k}: stored {v}, built {list(built[k].shape) if k in built else None}" for k, v in stored_shapes(target).items()
              if k not in built or list(built[k].shape) != v]
    if shapes:
        problems.append(f"shapes {shapes[:3]}")
    n = sum(p.numel() for p in model.parameters())   # a tied head counts once, as it is stored once
    stored = sum(math.prod(v) for v in stored_shapes(target).values())
    res.update(stock_parameters=n, stored_parameters=stored, llmsnp_parameters=mine["parameters"])
    if n != stored:
        problems.append(f"stock builds {n} parameters, {stored} are stored")
    # The prune itself must hold params_after; a padded copy holds the original shapes (plus any zero biases the
    # reconstruction's mean term made the stock class carry: attention_bias / mlp_bias add q/k/v and gate/up biases too).
    if not sub and stored != report["params_after"]:
        problems.append(f"{stored} parameters stored, the report says params_after {report['params_after']}")
    if sub and stored < report["params_before"]:
        problems.append(f"the padded copy stores {stored} parameters, fewer than the original {report['params_before']}")
    theirs = forward(model, ids)
    mine_t = torch.tensor(mine["logits"], dtype=torch.float64)
    if mine_t.shape != theirs.shape:
        return res, problems + [f"logits shape: LlmSnp {tuple(mine_t.shape)}, stock {tuple(theirs.shape)}"]
    res["logit_scale"] = mine_t.abs().max().item()
    res["max_abs_diff"] = (mine_t - theirs).abs().max().item()
    if kind == "llama":
        with float64_steps(model) as patched:
            res["max_abs_diff_float64_steps"] = (mine_t - forward(model, ids)).abs().max().item()
        if patched == 0:
            problems.append("no RMSNorm / RotaryEmbedding module found to promote")
        if not res["max_abs_diff"] <= a.tol_float32_steps:
            problems.append(f"max|Δlogit| {res['max_abs_diff']:.3g} > {a.tol_float32_steps:g} (stock as it runs)")
        if not res["max_abs_diff_float64_steps"] <= a.tol:
            problems.append(f"max|Δlogit| {res['max_abs_diff_float64_steps']:.3g} > {a.tol:g} (stock's float32 steps in float64)")
    elif not res["max_abs_diff"] <= a.tol:
        problems.append(f"max|Δlogit| {res['max_abs_diff']:.3g} > {a.tol:g}")
    return res, problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="directory for the prunes (default: a temporary one)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--tol", type=float, default=1e-9, help="max |Δlogit| where both sides compute in float64")
    ap.add_argument("--tol-float32-steps", type=float, default=1e-5, help="max |Δlogit| against stock LLaMA-family classes as they run")
    ap.add_argument("--json", default=None, help="write the record (versions, every case's figures) here")
    a = ap.parse_args()
    import torch, transformers
    # The whole check runs with float64 as torch's default dtype: on PyTorch < 2.1.1 (no SDPA) stock OPT's eager mask is
    # torch.full((t, t), finfo(float64).min) without a dtype, which overflows a float32 default.
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version()}
    print(f"# transformers {versions['transformers']}, torch {versions['torch']}, python {versions['python']}", flush=True)
    out = a.out or tempfile.mkdtemp(prefix="stock-load-")
    os.makedirs(out, exist_ok=True)
    results, failures = [], 0
    for name in a.cases.split(","):
        t0 = time.time()
        try:
            res, problems = check(name, a, out)
        except Exception as e:  # a failed prune or stock load is a result of the case, not a crash of the script
            res, problems = {"case": name, "shows": CASES[name][4]}, [f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"]
        res["problems"], res["ok"], res["seconds"] = problems, not problems, round(time.time() - t0, 1)
        failures += bool(problems)
        results.append(res)
        figures = ""
        if "max_abs_diff" in res:
            figures = f"max|Δlogit| {res['max_abs_diff']:.2g}"
            if "max_abs_diff_float64_steps" in res:
                figures += f" as stock runs, {res['max_abs_diff_float64_steps']:.2g} with its float32 steps in float64"
            figures += f"; params {res['params_before']} → {res['params_after']}, stock built {res['stock_parameters']}"
        elif "load_error" in res:
            figures = f"does not load, as it must ({res['load_error'][:120]})"
        print(f"{'ok  ' if res['ok'] else 'FAIL'} {name}: {figures}{'; ' + '; '.join(problems) if problems else ''}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"check": "tools/reference/stock_load_check.py", "date": time.strftime("%Y-%m-%d"), "versions": versions,
                       "tolerances": {"float64": a.tol, "stock_float32_steps": a.tol_float32_steps},
                       "cases": results, "failures": failures}, f, indent=1)
            f.write("\n")
    print(f"{len(results) - failures} ok, {failures} failed", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
