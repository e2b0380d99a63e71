#!/usr/bin/env python3
"""Markdown tables for docs/results.md from the eval reports of scripts/benchmark.sh.

Usage: scripts/results-tables.py bench-out [eval-dir-name]
Reads <out>/<eval-dir-name>/<texture>-p<level>-<loss>/report.json (default `eval`) and
<out>/curve/*/report.json.
"""
import json
import os
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def main(out, eval_name="eval"):
    rows = {}
    eval_dir = os.path.join(out, eval_name)
    for name in sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else []:
        path = os.path.join(eval_dir, name, "report.json")
        if not os.path.isfile(path):
            continue
        texture, rest = name.split("-p", 1)
        level, loss = rest.rsplit("-", 1)
        rows[(texture, float(level), loss)] = load(path)
    metrics = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"),
               ("pixel_ap", "pixel AUPRC"), ("pixel_aupro", "AUPRO@0.3"),
               ("reconstruction_mse", "reconstruction MSE (test images, [0, 1] units)")]
    digits = {"reconstruction_mse": 5}
    textures = sorted({k[0] for k in rows})
    levels = sorted({k[1] for k in rows})
    losses = [l for l in ["mse", "huber", "lts"] if any(k[2] == l for k in rows)]
    for key, title in metrics:
        print(f"\n**{title}** (rows: texture and contamination; columns: loss)\n")
        print("| texture | contamination | " + " | ".join(losses) + " |")
        print("|---|---:|" + "---:|" * len(losses))
        for t in textures:
            for p in levels:
                cells = [fmt(rows[(t, p, l)]["overall"][key], digits.get(key, 3)) if (t, p, l) in rows else "–"
                         for l in losses]
                print(f"| {t} | {p:.0%} | " + " | ".join(cells) + " |")
    if rows:
        print("\nMean over textures and contamination levels:\n")
        print("| loss | " + " | ".join(t.split(" (")[0] for _, t in metrics) + " |")
        print("|---|" + "---:|" * len(metrics))
        for l in losses:
            vals = []
            for key, _ in metrics:
                xs = [r["overall"][key] for k, r in rows.items() if k[2] == l and r["overall"][key] is not None]
                vals.append(fmt(sum(xs) / len(xs), digits.get(key, 3)) if xs else "n/a")
            print(f"| {l} | " + " | ".join(vals) + " |")
    curve_dir = os.path.join(out, "curve")
    if eval_name == "eval" and os.path.isdir(curve_dir):
        points = []
        for name in os.listdir(curve_dir):
            path = os.path.join(curve_dir, name, "report.json")
            if os.path.isfile(path):
                r = load(path)
                points.append((r["unet_calls_per_image"], r["reconstruction"]["t0"], r["reconstruction"]["sampler"], r))
        print("\n| sampler | t0 | UNet calls / image | pixel AUROC | AUPRO@0.3 | image AUROC | ms / image |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for calls, t0, sampler, r in sorted(points, key=lambda p: (p[0], p[1])):
            o = r["overall"]
            print(f"| {sampler} | {t0} | {calls} | {fmt(o['pixel_auroc'])} | {fmt(o['pixel_aupro'])} | "
                  f"{fmt(o['image_auroc'])} | {r['ms_per_image']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-out", sys.argv[2] if len(sys.argv) > 2 else "eval")
