#!/usr/bin/env python3
"""Runs `llmsnp prune --drop-blocks` for every block count x criterion x replacement (and optional width policies)
and collects each run's depth report and dense/pruned metric into one JSON (eval/README.md names the files it wrote).

LLMSNP (environment) replaces the ./llmsnp command (a frozen copy of the build, say).
usage: depth_sweep.py --model DIR --out FILE.json --drops 1,2,3,4 [--criteria influence,angular,lstsq]
       [--replace none,lstsq] [--extra "--ratio 0.2"] -- PRUNE-ARGS...
"""
import argparse, json, os, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--drops", default="1,2,3,4")
ap.add_argument("--criteria", default="influence,angular,lstsq")
ap.add_argument("--replace", default="none,lstsq")
ap.add_argument("--extra", action="append", default=[], help="extra prune options per run (a width policy); repeatable, each a case")
ap.add_argument("rest", nargs=argparse.REMAINDER)
a = ap.parse_args()
rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
extras = a.extra or [""]
runs, dense = [], None
tmp = tempfile.mkdtemp(prefix="depth-sweep-")
for extra in extras:
    for n in a.drops.split(","):
        for crit in a.criteria.split(","):
            for rep in a.replace.split(","):
                out = os.path.join(tmp, "m")
                js = os.path.join(tmp, "r.json")
                cmd = os.environ.get("LLMSNP", "./llmsnp").split() + ["prune", "--model", a.model, "--out", out, "--force", "--json", js,
                       "--drop-blocks", n, "--depth-criterion", crit, "--depth-replace", rep] + extra.split() + rest
                t = time.time()
                p = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"FAILED {' '.join(cmd)}\n{p.stderr[-2000:]}", file=sys.stderr)
                    runs.append({"drop_blocks": int(n), "criterion": crit, "replace": rep, "width": extra, "error": p.stderr.strip().splitlines()[-1:]})
                    continue
                r = json.load(open(js))
                ev = r["eval"]
                metric = "top1" if "top1" in ev["pruned"] else ("perplexity" if "perplexity" in ev["pruned"] else "mean_acc")
                dense = {"metric": metric, "value": ev["dense"][metric], "params": r["params_before"], "details": ev["dense"]}
                d = r["depth"]
                row = {
                    "drop_blocks": int(n), "criterion": crit, "replace": rep, "width": extra,
                    "removed_blocks": d["removed_blocks"], metric: ev["pruned"][metric],
                    "params_after": r["params_after"], "spans": d["spans"], "scores": d["scores"],
                    "seconds": round(time.time() - t, 1),
                }
                if "top5" in ev["pruned"]: row["top5"] = ev["pruned"]["top5"]
                if "speed" in r: row["speed"] = r["speed"]
                runs.append(row)
                print(f"{n} {crit:9s} {rep:5s} {extra:14s} removed {d['removed_blocks']} {metric} {ev['pruned'][metric]:.4g} (dense {ev['dense'][metric]:.4g})", flush=True)
result = {
    "what": "depth pruning sweep: blocks removed x criterion x replacement",
    "command": "python3 eval/scripts/depth_sweep.py " + " ".join(sys.argv[1:]),
    "date": time.strftime("%Y-%m-%d", time.gmtime()),
    "dense": dense, "runs": runs,
}
os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
json.dump(result, open(a.out, "w"), indent=1)
