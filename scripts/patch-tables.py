#!/usr/bin/env python3
"""Markdown tables for docs/results.md from scripts/patch-benchmark.sh's reports.

Usage: scripts/patch-tables.py bench-patch
Reads <out>/eval/<variant>/<texture>-p<level>-s<seed>-<loss>/report.json for the variants
fused, recon, patch and untrimmed, and prints per texture the mean ± sd over seeds of pixel
AUROC, pixel AUPRC and image AUROC, then pixel AUROC per defect type.
"""
import json
import os
import re
import statistics
import sys

NAME = re.compile(r"^(?P<texture>[a-z]+)-p(?P<level>[0-9.]+)-s(?P<seed>[0-9]+)-(?P<loss>[a-z]+)$")
VARIANTS = [
    ("recon", "reconstruction only (searched rule)"),
    ("patch", "patch model only (trim 0.1)"),
    ("untrimmed", "patch model only (no trim)"),
    ("fused", "fused (shipped: searched rule + patch, w 0.5)"),
]
TYPES = ["scratch", "hole", "stain", "crack", "foreign", "wear", "dent"]


def load(out):
    rows = {}
    for variant, _ in VARIANTS:
        base = os.path.join(out, "eval", variant)
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            match = NAME.match(name)
            path = os.path.join(base, name, "report.json")
            if match and os.path.isfile(path):
                with open(path) as f:
                    key = (variant, match["texture"], match["loss"])
                    rows.setdefault(key, []).append(json.load(f))
    return rows


def stat(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(out):
    rows = load(out)
    textures = sorted({t for (_, t, _) in rows})
    losses = sorted({l for (_, _, l) in rows})
    for loss in losses:
        print(f"\n| map ({loss}) | texture | seeds | pixel AUROC | pixel AUPRC | image AUROC | ms/image |")
        print("|---|---|---|---|---|---|---|")
        for variant, label in VARIANTS:
            for texture in textures:
                reports = rows.get((variant, texture, loss), [])
                if not reports:
                    continue
                overall = [r["overall"] for r in reports]
                print(
                    f"| {label} | {texture} | {len(reports)} | {stat([o['pixel_auroc'] for o in overall])} | "
                    f"{stat([o['pixel_ap'] for o in overall])} | {stat([o['image_auroc'] for o in overall])} | "
                    f"{statistics.mean(r['ms_per_image'] for r in reports):.0f} |"
                )
        print(f"\n| pixel AUROC per defect type ({loss}) | texture | " + " | ".join(TYPES) + " |")
        print("|---|---|" + "---|" * len(TYPES))
        for variant, label in VARIANTS:
            for texture in textures:
                reports = rows.get((variant, texture, loss), [])
                if not reports:
                    continue
                cells = [stat([r["per_type"].get(t, {}).get("pixel_auroc") for r in reports]) for t in TYPES]
                print(f"| {label} | {texture} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-patch")
