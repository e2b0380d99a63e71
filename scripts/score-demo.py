#!/usr/bin/env python3
"""Scores `edge-inspect infer` outputs on the demo test set against its ground truth.

For checking the demo model until the `eval` subcommand exists; needs numpy, pillow and
scikit-learn. Usage (after `./scripts/demo-infer`, or any infer run over data/brick/test/*/*.png):

    python3 scripts/score-demo.py out/demo [data/brick]
"""
import json
import os
import sys

import numpy as np
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score


def main():
    out = sys.argv[1]
    data = sys.argv[2] if len(sys.argv) > 2 else "data/brick"
    image_labels, image_scores, pixel_labels, pixel_scores = [], [], [], []
    for line in open(os.path.join(out, "results.jsonl")):
        result = json.loads(line)
        kind = os.path.basename(os.path.dirname(result["image"]))
        stem = os.path.splitext(os.path.basename(result["image"]))[0]
        scores = np.asarray(Image.open(os.path.join(out, result["outputs"][0])), dtype=np.float64) / 65535
        if kind == "good":
            truth = np.zeros(scores.shape, dtype=bool)
        else:
            truth = np.asarray(Image.open(os.path.join(data, "ground_truth", kind, f"{stem}_mask.png"))) > 0
        image_labels.append(kind != "good")
        image_scores.append(result["score"])
        pixel_labels.append(truth.ravel())
        pixel_scores.append(scores.ravel())
        print(f"{kind:8s} {stem}: {result['label']:9s} normalised score {result['normalised_score']:.3f}, defect area {result['defect_area']}")
    pixel_labels, pixel_scores = np.concatenate(pixel_labels), np.concatenate(pixel_scores)
    print(f"image AUROC {roc_auc_score(image_labels, image_scores):.3f}")
    print(f"pixel AUROC {roc_auc_score(pixel_labels, pixel_scores):.3f}, pixel AP {average_precision_score(pixel_labels, pixel_scores):.3f}")


if __name__ == "__main__":
    main()
