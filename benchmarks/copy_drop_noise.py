"""How much of an issued copy's accuracy drop is the test set's own noise.

A copy's drop is a paired difference on the same 10,000 test images: the copy loses some
images the base got right and gains others. If a copy cost nothing, its measured drop
would still scatter around 0 with the paired standard error ``sqrt(lost + gained) / n``,
and the largest of many copies' drops would sit well above 0. This script reads every
issued copy of the pipeline (``data/customers/*/model.safetensors``, tensors only), counts
what each loses and gains against the base model, and reports per copy the drop and its
paired standard error, then the mean drop (the systematic cost) and the largest drop that
copies costing nothing would show (the expected maximum of as many draws of
N(0, s.e.), by simulation): the floor under ``accuracy_drop_max``.

Needs the outputs of ``dvc repro issue``; run from the repository root:

    python benchmarks/copy_drop_noise.py
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import report  # noqa: E402  (sibling module: scripts run as python benchmarks/<name>.py)

OUT = Path(__file__).resolve().parent / "results" / "copy_drop_noise.json"


def predictions(path: Path, images: torch.Tensor) -> torch.Tensor:
    from securemark.weights import load_weights

    model = load_weights(path).eval()
    with torch.no_grad():
        return torch.cat([model(images[i : i + 2000]).argmax(1) for i in range(0, len(images), 2000)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=100_000, help="simulated sets of copies that cost nothing")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from flows.adapters.paths import Paths
    from securemark.storage import read_partition

    paths = Paths.from_env()
    copies = sorted(paths.customers.glob("*/model.safetensors"))
    if not copies:
        sys.exit(f"no issued copies under {paths.customers}: run `dvc repro issue` first")
    test = read_partition(paths.partition("test"))
    images, labels = test.as_float(), test.labels
    n = len(labels)
    base = predictions(paths.model("defended"), images)
    base_right = base == labels
    rows = []
    for path in copies:
        pred = predictions(path, images)
        right = pred == labels
        lost, gained = int((base_right & ~right).sum()), int((right & ~base_right).sum())
        rows.append({"customer": path.parent.name, "drop_pt": 100 * (lost - gained) / n, "lost": lost, "gained": gained,
                     "disagree": int((pred != base).sum()), "paired_se_pt": 100 * math.sqrt(lost + gained) / n})
        print(f"{path.parent.name}: drop {rows[-1]['drop_pt']:.2f} pt (lost {lost}, gained {gained}, s.e. {rows[-1]['paired_se_pt']:.2f} pt)", flush=True)
    se = np.array([r["paired_se_pt"] for r in rows])
    drops = np.array([r["drop_pt"] for r in rows])
    null_max = (np.random.default_rng(0).standard_normal((args.draws, len(se))) * se).max(1)
    report({"copies": len(rows), "test_images": n, "drop_mean_pt": float(drops.mean()), "drop_max_pt": float(drops.max()),
            "paired_se_mean_pt": float(se.mean()), "disagree_mean": float(np.mean([r["disagree"] for r in rows]) / n),
            "null_drop_max_median_pt": float(np.median(null_max)), "null_drop_max_p90_pt": float(np.quantile(null_max, 0.9)),
            "rows": rows}, args.out, one_line=False)
    print(f"mean drop {drops.mean():.3f} pt, max {drops.max():.2f} pt; copies that cost nothing would show a max of "
          f"{np.median(null_max):.2f} pt (median; 90 % below {np.quantile(null_max, 0.9):.2f})")


if __name__ == "__main__":
    main()
