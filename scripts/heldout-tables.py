#!/usr/bin/env python3
"""Markdown tables for docs/results.md from scripts/heldout-benchmark.sh's reports.

Usage: scripts/heldout-tables.py bench-heldout
Reads <out>/eval-auto/<texture>-p<level>-<loss>[<suffix>]/report.json (the manifest's
searched operating point) and <out>/eval-old/... (L1 pixel residual, t0 100, 10 DDIM steps),
and the chosen operating point from <out>/models/<name>/manifest.toml. With a second argument
only the reports with that suffix are read (e.g. `-w32-s800` of the width study); without
one, only those without a suffix.
"""
import json
import os
import re
import sys
import tomllib

TUNING = {"brick"}


NAME = re.compile(r"^(?P<texture>[a-z]+)-p(?P<level>[0-9.]+)-(?P<loss>mse|huber|lts)(?P<suffix>.*)$")


def load_reports(out, kind, suffix):
    rows = {}
    base = os.path.join(out, kind)
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        path = os.path.join(base, name, "report.json")
        match = NAME.match(name)
        if os.path.isfile(path) and match and match["suffix"] == suffix:
            with open(path) as f:
                rows[(match["texture"], float(match["level"]), match["loss"])] = json.load(f)
    return rows


def fmt(v):
    return "–" if v is None else f"{v:.3f}"


def main(out, suffix):
    auto, old = load_reports(out, "eval-auto", suffix), load_reports(out, "eval-old", suffix)
    keys = sorted(set(auto) | set(old), key=lambda k: (k[0] in TUNING, k[0], k[1], ["mse", "huber", "lts"].index(k[2])))
    print("| texture | role | contamination | loss | operating point (t0[+ensemble t0] / steps / condition / map) | "
          "pixel AUROC old → new | pixel AUPRC old → new | image AUROC old → new | "
          "new pixel AUROC: crack / foreign (shapes never searched on) |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|")
    for k in keys:
        texture, level, loss = k
        manifest_path = os.path.join(out, "models", f"{texture}-p{level:g}-{loss}{suffix}", "manifest.toml")
        point = "–"
        if os.path.isfile(manifest_path):
            with open(manifest_path, "rb") as f:
                m = tomllib.load(f)
            r = m["reconstruction"]
            t0 = "+".join(str(t) for t in [r["t0"]] + m.get("ensemble", {}).get("extra_t0", []))
            point = f"{t0} / {r['steps']} / {r.get('condition', 0):g} / {m['anomaly']['residual']}"
        a, o = auto.get(k), old.get(k)
        cell = lambda rep, key: fmt(rep["overall"][key]) if rep else "–"
        unseen = "–"
        if a:
            unseen = " / ".join(fmt(a["per_type"].get(t, {}).get("pixel_auroc")) for t in ["crack", "foreign"])
        role = "tuning" if texture in TUNING else "held-out"
        print(f"| {texture} | {role} | {level:.0%} | {loss} | {point} | "
              f"{cell(o, 'pixel_auroc')} → {cell(a, 'pixel_auroc')} | {cell(o, 'pixel_ap')} → {cell(a, 'pixel_ap')} | "
              f"{cell(o, 'image_auroc')} → {cell(a, 'image_auroc')} | {unseen} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-heldout", sys.argv[2] if len(sys.argv) > 2 else "")
