"""Base model: architecture and recipe against test accuracy and training time.

Trains each candidate centrally (no split, no defence: what the owners' 45,000 images
allow at best) with the project's own model and training code, on the ``owner_*``
partitions, and scores it on the 10,000 test images. Every row: widths, dense blocks,
label smoothing, augmentation, epochs, test accuracy, seconds (this machine, 2 threads).
Needs the partitions (``dvc repro prepare``); run from the repository root:

    python benchmarks/model_recipe.py                # the table in docs/pipeline.md "train"
    python benchmarks/model_recipe.py --only 0 3     # some rows
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.model import ModelSpec, accuracy, build_model
from securemark.storage import read_partition
from securemark.training import Recipe, train_with_recipe

OUT = Path(__file__).resolve().parent / "results" / "model_recipe.json"

# (widths, hidden, label smoothing, augment, epochs); batch norm, dropout 0.4, AdamW
# 2e-3 with a one-cycle schedule, batch 128 throughout.
CANDIDATES = [
    ((16, 32, 64), (), 0.0, False, 12),   # three conv blocks straight into the head (the old model, with batch norm)
    ((16, 32, 64), (), 0.0, True, 12),    # ... with crop + flip
    ((32, 64), (), 0.0, False, 8),        # two wider conv blocks into the head
    ((16, 32), (128,), 0.0, False, 10),   # a dense block before the head
    ((32, 64), (256,), 0.0, False, 8),
    ((32, 64), (256,), 0.1, False, 8),    # ... label smoothing: the default
    ((32, 64), (256,), 0.1, False, 10),
    ((32, 64), (256,), 0.1, True, 10),
    ((24, 48), (256,), 0.1, False, 10),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", type=Path, default=Path("data/partitions"))
    ap.add_argument("--only", type=int, nargs="*", help="indices of CANDIDATES to run (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    owners = sorted(args.partitions.glob("owner_*"))
    parts = [read_partition(p) for p in owners]
    images = torch.cat([p.as_float() for p in parts])
    labels = torch.cat([p.labels for p in parts])
    test = read_partition(args.partitions / "test")
    rows = []
    for i, (widths, hidden, smoothing, augment, epochs) in enumerate(CANDIDATES):
        if args.only and i not in args.only:
            continue
        spec = ModelSpec(widths=widths, hidden=hidden, cut=1)
        recipe = Recipe(epochs=epochs, label_smoothing=smoothing, augment=augment)
        start = time.perf_counter()
        model = train_with_recipe(build_model(spec, args.seed), images, labels, recipe, torch.Generator().manual_seed(args.seed))
        row = {"widths": list(widths), "hidden": list(hidden), "label_smoothing": smoothing, "augment": augment, "epochs": epochs,
               "train_images": len(labels), "test_accuracy": accuracy(model, test.as_float(), test.labels),
               "seconds": round(time.perf_counter() - start, 1), "parameters": sum(p.numel() for p in model.parameters())}
        print(row, flush=True)
        rows.append(row)
    report(rows, args.out, one_line=False)


if __name__ == "__main__":
    main()
