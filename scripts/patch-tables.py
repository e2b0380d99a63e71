#!/usr/bin/env python3
"""Markdown tables for docs/results.md from scripts/patch-benchmark.sh's reports.

Usage: scripts/patch-tables.py bench-patch [OLD]
Reads <out>/eval/<variant>/<texture>-p<level>-s<seed>-<loss>/report.json for the variants
fused, recon, patch and untrimmed, and prints per texture the mean ± sd over seeds of pixel
AUROC, pixel AUPRC and image AUROC, then pixel AUROC per defect type. Where the bundles'
search chose the fusion weight, it then compares the criterion with the test set's truth per
weight (scripts/fusion-ranking.sh scores the weights in between) and, given OLD (the same
benchmark made by an earlier criterion on the same data and UNets), the head's criterion then
and now.
"""
import json
import os
import re
import statistics
import sys
import tomllib

NAME = re.compile(r"^(?P<texture>[a-z]+)-p(?P<level>[0-9.]+)-s(?P<seed>[0-9]+)-(?P<loss>[a-z]+)$")
VARIANTS = [
    ("recon", "reconstruction only (searched rule)"),
    ("patch", "patch model only (trim 0.1)"),
    ("untrimmed", "patch model only (no trim)"),
    ("fused", "fused (as shipped: searched rule + patch map)"),
    ("w0.5", "fused at ½ (eval --fusion-weight 0.5)"),
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


def spearman(xs, ys):
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else float("nan")


def manifest(out, name):
    path = os.path.join(out, "models", "fused", name, "manifest.toml")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return tomllib.load(f)


def truth(out, name, weight, chosen):
    variant = {0.0: "recon", 1.0: "patch"}.get(weight, "fused" if weight == chosen else f"w{weight:g}")
    path = os.path.join(out, "eval", variant, name, "report.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["overall"]["pixel_ap"]


def ranking(out, old):
    names = sorted(os.listdir(os.path.join(out, "models", "fused")))
    rows = []
    for name in names:
        m = manifest(out, name)
        point = (m or {}).get("operating_point", {})
        fusion = point.get("fusion_candidates", [])
        if not fusion or not NAME.match(name):
            continue
        chosen = fusion[0]["patch_weight"]
        weights = sorted(f["patch_weight"] for f in fusion)
        criterion = {f["patch_weight"]: f["pixel_auprc"] for f in fusion}
        test = {w: truth(out, name, w, chosen) for w in weights}
        scored = [w for w in weights if test[w] is not None]
        rho = spearman([criterion[w] for w in scored], [test[w] for w in scored]) if len(scored) > 2 else None
        best = max((test[w] for w in scored), default=None)
        regret = best - test[chosen] if best is not None and test[chosen] is not None else None
        head = [c["pixel_auprc"] for c in point.get("candidates", []) if c["residual"] == "head"]
        old_m = manifest(old, name) if old else None
        old_head = [c["pixel_auprc"] for c in (old_m or {}).get("operating_point", {}).get("candidates", [])
                    if c["residual"] == "head"]
        rows.append((name, chosen, weights, criterion, test, rho, regret, head, old_head, point["chosen"]["residual"]))
    if not rows:
        return
    print("\n| bundle | rule | chosen w | criterion AUPRC at w = " + " / ".join(f"{w:g}" for w in rows[0][2])
          + " | test AUPRC at w = " + " / ".join(f"{w:g}" for w in rows[0][2]) + " | Spearman ρ | regret |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda v: "–" if v is None else f"{v:.3f}"
    for name, chosen, weights, criterion, test, rho, regret, *_, rule in rows:
        print(f"| {name} | {rule} | {chosen:g} | " + " / ".join(fmt(criterion[w]) for w in weights) + " | "
              + " / ".join(fmt(test[w]) for w in weights) + f" | {fmt(rho)} | {fmt(regret)} |")
    if old:
        head_against_pixel(out, old, [r[0] for r in rows])


def pixel_auprc(out, variant, name):
    path = os.path.join(out, "eval", variant, name, "report.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["overall"]["pixel_ap"]


def head_against_pixel(out, old, names):
    """Head against the best single pixel candidate: each criterion's figures and the truth.

    The UNets are the same in both runs (same seed and data), so the pixel candidate's truth
    (eval/pixel) holds for both; the heads differ (trained on other families), so each run's
    head is scored by its own eval/recon (the shipped rule, where the head was chosen).
    """
    fmt = lambda v: "–" if v is None else f"{v:.3f}"
    print("\n| bundle | criterion: head / best pixel rule, old | new (unseen groups) | test AUPRC: old head / new head / pixel rule |")
    print("|---|---|---|---|")
    key = lambda c: (c["t0"], c["steps"], c["condition"], c["residual"])
    for name in names:
        new_m, old_m = manifest(out, name), manifest(old, name)
        if not new_m or not old_m:
            continue
        new_c, old_c = new_m["operating_point"]["candidates"], old_m["operating_point"]["candidates"]
        pixel = next(c for c in new_c if c["residual"] in ("l1", "ssim", "msgms") and not c.get("extra_t0"))
        old_pixel = next((c for c in old_c if key(c) == key(pixel) and not c.get("extra_t0")), None)
        head = lambda cs: next((c["pixel_auprc"] for c in cs if c["residual"] == "head"), None)
        truth = lambda run, m: pixel_auprc(run, "recon", name) if m["anomaly"]["residual"] == "head" else None
        print(f"| {name} | {fmt(head(old_c))} / {fmt(old_pixel and old_pixel['pixel_auprc'])} | "
              f"{fmt(head(new_c))} / {fmt(pixel['pixel_auprc'])} | {fmt(truth(old, old_m))} / "
              f"{fmt(truth(out, new_m))} / {fmt(pixel_auprc(out, 'pixel', name))} |")


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "bench-patch"
    main(out)
    ranking(out, sys.argv[2] if len(sys.argv) > 2 else None)
