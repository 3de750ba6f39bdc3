#!/usr/bin/env python3
"""Markdown tables (metric by method and ratio) from a comparison.csv written by `llmsnp compare`."""
import csv, sys
from collections import defaultdict

def table(path, targets):
    rows = list(csv.DictReader(open(path)))
    dense = float(next(r for r in rows if r["targets"] == "dense")["metric"])
    by = defaultdict(dict)
    ratios = sorted({float(r["ratio"]) for r in rows if r["targets"] == targets})
    removed = {}
    for r in rows:
        if r["targets"] != targets:
            continue
        by[r["method"]][float(r["ratio"])] = float(r["metric"])
        removed.setdefault(float(r["ratio"]), []).append(float(r["fraction_removed"]))
    head = "| method | " + " | ".join(f"{x:.0%} (≈{sum(removed[x]) / len(removed[x]):.0%} removed)" for x in ratios) + " |"
    out = [head, "|---|" + "---|" * len(ratios), f"| dense | " + " | ".join(f"{dense:.2f}" for _ in ratios) + " |"]
    for m, vals in by.items():
        out.append(f"| {m} | " + " | ".join(f"{vals[x]:.2f}" for x in ratios) + " |")
    return "\n".join(out)

if __name__ == "__main__":
    print(table(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "mlp+heads"))
