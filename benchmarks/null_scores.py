"""Innocent scores against the trace threshold, from independently trained models.

A model trained without any fingerprint carries none of the code words, so every
customer's score against it is an innocent score. This trains ``--models`` such models
(fresh initial weights, ``--epochs`` on the attacker partition, as a customer who never
bought a copy would), re-aligns each to the base model as tracing does, extracts ``y``
with the vendor's key and scores all code words of the vendor's codebook: ``models x
capacity`` innocent scores per reading (the plain and the drift-whitened reading, each
against its threshold at ``epsilon / 2``, as a trace decides). Each model is also read
under ``--random-keys`` other keys, which multiplies the count.

Reports the count, the maximum and the upper quantiles against the distribution-free
threshold of the trace (and, for comparison, the threshold a Gaussian model of scores
would give), and how many scores exceed each. Needs the project's artifacts
(`make run` or `dvc repro issue`): run from the repository root.

    python benchmarks/null_scores.py --models 12 --random-keys 9
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm
from tqdm.auto import tqdm

from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.vendor import open_vendor
from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.key import projection, random_secret
from securemark.model import build_model
from securemark.scoring import create_scorer, score_all, threshold
from securemark.storage import read_partition
from securemark.training import train_epochs

OUT = Path(__file__).resolve().parent / "results" / "null_scores.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=12, help="independently trained models")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--random-keys", type=int, default=9, help="extra random keys per model (0: the vendor's key only)")
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    root = args.root.resolve()
    paths = Paths(root)
    settings = Settings.load(paths.params)
    cfg, spec = settings.trace, settings.model
    vendor = open_vendor(paths, settings)
    extractor = vendor.extractor()
    codebook = vendor.codebook  # every code word: the trace scores the whole codebook (codebook_indices)
    n = len(codebook)
    scorer = create_scorer(cfg.scorer)
    attacker = read_partition(paths.partition("attacker"))
    keys = [vendor.key_matrix] + [projection(random_secret(), vendor.key.layer, codebook.length, vendor.key.n_weights) for _ in range(args.random_keys)]

    start = time.perf_counter()
    scores, thresholds, readings = [], [], []
    for i in tqdm(range(args.models), desc="independent models", unit="model"):
        model = train_epochs(build_model(spec, 50_000 + i), attacker.as_float(), attacker.labels, args.epochs, torch.Generator().manual_seed(50_000 + i))
        aligned, _ = extractor.aligned(model)
        for K in keys:
            ys = extractor.readings(aligned, K)
            for name, y in ys.items():
                w = scorer.weights(y)
                scores.append(score_all(codebook, w))
                thresholds.append(threshold(w, codebook.biases, cfg.epsilon / len(ys), n))
                readings.append(name)
    all_scores = np.concatenate(scores)
    per_model_ratio = [float(s.max() / t) for s, t in zip(scores, thresholds)]
    gaussian = float(norm.isf(cfg.epsilon / n))  # what a Gaussian model of scores would use
    result = {
        "innocent_scores": int(all_scores.size),
        "models": args.models,
        "keys_per_model": len(keys),
        "readings": sorted(set(readings)),
        "max_ratio_to_threshold_by_reading": {r: max(float(s.max() / t) for s, t, q in zip(scores, thresholds, readings) if q == r)
                                              for r in sorted(set(readings))},
        "customers": n,
        "epsilon": cfg.epsilon,
        "aligned": cfg.align,
        "max_score": float(all_scores.max()),
        "quantile_0_9999": float(np.quantile(all_scores, 0.9999)),
        "mean": float(all_scores.mean()),
        "std": float(all_scores.std()),
        "threshold_min": float(min(thresholds)),
        "threshold_max": float(max(thresholds)),
        "above_threshold": int(sum(int((s >= t).sum()) for s, t in zip(scores, thresholds))),
        "max_ratio_to_threshold": max(per_model_ratio),
        "gaussian_threshold": gaussian,
        "above_gaussian_threshold": int((all_scores >= gaussian).sum()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if not math.isfinite(result["threshold_max"]):
        result["note"] = "threshold is infinite for some weights (code too short for epsilon): no one can be accused there"
    report(result, args.out)


if __name__ == "__main__":
    main()
