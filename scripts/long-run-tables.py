#!/usr/bin/env python3
"""Markdown tables for docs/results.md from scripts/long-run.sh's reports.

Usage: scripts/long-run-tables.py bench-long
Reads <out>/eval/<rule>/<loss>-<step>/report.json (rule: old, t25, auto on the test set;
train-old, train-t25 on the training frames) and the training reports
<out>/models/<name>.report.json (the loss curve). Prints, per fixed rule, pixel AUROC / pixel
AUPRC / image AUROC on the test set against training steps for each loss, the image AUROC of
the contaminated training frames against the clean ones under both rules, then the final
bundles at their searched operating points, then the loss curves.
"""
import json
import os
import re
import sys

LOSSES = ["mse", "huber", "lts"]
RULES = {
    "old": "L1 pixel residual, t0 100, 10 DDIM steps",
    "t25": "L1 pixel residual, t0 25, 1 DDIM step",
}
NAME = re.compile(r"^(?P<loss>mse|huber|lts)-(?P<step>[0-9]+)$")


def load(out, rule):
    rows = {}
    base = os.path.join(out, "eval", rule)
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        match = NAME.match(name)
        path = os.path.join(base, name, "report.json")
        if match and os.path.isfile(path):
            with open(path) as f:
                rows[(match["loss"], int(match["step"]))] = json.load(f)["overall"]
    return rows


def cell(report):
    if report is None:
        return "–"
    return f"{report['pixel_auroc']:.3f} / {report['pixel_ap']:.3f} / {report['image_auroc']:.3f}"


def fixed_rule_table(out, rule):
    rows = load(out, rule)
    steps = sorted({step for _, step in rows})
    losses = [loss for loss in LOSSES if any(key[0] == loss for key in rows)]
    print(f"\n**{RULES[rule]}** (pixel AUROC / pixel AUPRC / image AUROC)\n")
    print("| steps | " + " | ".join(losses) + " |")
    print("|---" * (len(losses) + 1) + "|")
    for step in steps:
        print(f"| {step} | " + " | ".join(cell(rows.get((loss, step))) for loss in losses) + " |")


def training_frames_table(out):
    rows = {rule: load(out, f"train-{rule}") for rule in RULES}
    steps = sorted({step for table in rows.values() for _, step in table})
    if not steps:
        return
    columns = [(rule, loss) for rule in RULES for loss in LOSSES]
    print("\n**The training frames: image AUROC of the 40 contaminated against the 160 clean** "
          "(t0 100 / 10 steps, then t0 25 / 1 step)\n")
    print("| steps | " + " | ".join(f"{loss} ({rule})" for rule, loss in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for step in steps:
        cells = []
        for rule, loss in columns:
            report = rows[rule].get((loss, step))
            cells.append("–" if report is None else f"{report['image_auroc']:.3f}")
        print(f"| {step} | " + " | ".join(cells) + " |")


def searched_table(out):
    rows = load(out, "auto")
    if not rows:
        return
    print("\n**Final bundles at their searched operating point** (pixel AUROC / pixel AUPRC / image AUROC)\n")
    print("| loss | steps | scores |")
    print("|---|---|---|")
    for (loss, step), report in sorted(rows.items(), key=lambda kv: LOSSES.index(kv[0][0])):
        print(f"| {loss} | {step} | {cell(report)} |")


def loss_curves(out):
    curves = {}
    models = os.path.join(out, "models")
    for name in sorted(os.listdir(models)) if os.path.isdir(models) else []:
        if name.endswith(".report.json"):
            with open(os.path.join(models, name)) as f:
                report = json.load(f)
            curves[name.removesuffix(".report.json")] = (report["config"]["steps"], report["loss"]["curve"])
    if not curves:
        return
    names = sorted(curves)
    print("\n**Training loss** (mean over each hundredth of the run, at every tenth of it)\n")
    print("| steps | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    steps, _ = curves[names[0]]
    for i in range(9, 100, 10):
        print(f"| {(i + 1) * steps // 100} | " + " | ".join(
            f"{curves[n][1][i]:.4f}" if i < len(curves[n][1]) else "–" for n in names) + " |")


def main(out):
    for rule in RULES:
        fixed_rule_table(out, rule)
    training_frames_table(out)
    searched_table(out)
    loss_curves(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-long")
