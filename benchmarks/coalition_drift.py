"""Averaging coalitions that then fine-tune: the plain and the drift-whitened readings,
by code length and margin, on real copies issued the pipeline's way.

For each ``--config LENGTH:MARGIN``, ``--copies`` copies of the pipeline's base model are
issued with the batched embedding (both marks, the params' settings with that code length
and margin) under a throwaway vendor state: a fresh secret in a temporary folder, so the
vendor's real state is never touched. Then, for each coalition size, ``--trials`` random
coalitions average their copies and fine-tune (``average>fine_tune>prune``: 1 epoch of
Adam then 50 % pruning; ``average>fine_tune``: 3 epochs), on the attacker's images; every
attacked model is traced with the pipeline's extractor (re-alignment, both readings,
epsilon split) over the whole codebook. Reported per cell: colluders caught per trial,
innocents accused, and the best colluder's score over the threshold in each reading.
Needs the pipeline's artifacts (``make run``); run from the repository root:

    python benchmarks/coalition_drift.py --config 1024:0.3 2048:0.21 --sizes 8 16 --trials 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flows.adapters.partitions import attacker_data, test_set
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings, load_params
from flows.adapters.vendor import open_vendor
from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.attacks import create_attack
from securemark.evaluation.grid import draw_coalitions
from securemark.tracing.blackbox import targets
from securemark.embedding import Job, copy_accuracy, embed_batch
from securemark.key import create_secret, derive_seed
from securemark.model import accuracy
from securemark.scoring import create_scorer, score_all, threshold
from securemark.tracing import codebook_indices, decide_readings

OUT = Path(__file__).resolve().parent / "results" / "coalition_drift.json"
ATTACKS = {
    "average>fine_tune_adam>prune": [{"attack": "average"}, {"attack": "fine_tune", "epochs": 1}, {"attack": "prune", "rate": 0.5}],
    "average>fine_tune_adam(3)": [{"attack": "average"}, {"attack": "fine_tune", "epochs": 3}],
}


def best_ratio(y: np.ndarray, codebook, indices, guilty: set[int], epsilon: float) -> float:
    """The best colluder's score over the threshold a reading decides with (first peeling step)."""
    w = create_scorer("correlation").weights(y)
    scores = score_all(codebook, w)
    return float(max(scores[g] for g in guilty) / threshold(w, codebook.biases, epsilon, len(indices)))


def run_config(root: Path, length: int, margin: float, args) -> dict:
    params = load_params(root / "params.yaml")
    params["fingerprint"]["code"]["code_length"] = length
    params["fingerprint"]["margin"] = margin
    settings = Settings.from_params(params)
    with tempfile.TemporaryDirectory(prefix="securemark-bench-") as tmp:
        os.environ["SECUREMARK_SECRET_FILE"] = str(Path(tmp) / "secret.key")
        os.environ["SECUREMARK_VENDOR_DIR"] = str(Path(tmp) / "vendor")
        create_secret(Path(tmp) / "secret.key")
        paths = Paths(root)
        vendor = open_vendor(paths, settings)
        extractor = vendor.extractor()
        space, test_rows, test_labels = vendor.carrier_space()
        keyset = vendor.keyset
        words = {f"bench-{i:03d}": i for i in range(args.copies)}
        jobs = [Job(c, vendor.codebook.word(i), targets(keyset, vendor.blackbox_codebook.word(i)), derive_seed(vendor.secret, f"embed|{c}"))
                for c, i in words.items()]
        start = time.perf_counter()
        outcomes = embed_batch(space, jobs, vendor.config.embed)
        seconds = (time.perf_counter() - start) / len(jobs)
        copies = {o.name: o.result.model for o in outcomes if o.result is not None}
        base_accuracy = copy_accuracy(space, extractor.reference, test_rows, test_labels)
        drops = [100 * (base_accuracy - copy_accuracy(space, m, test_rows, test_labels)) for m in copies.values()]
        data, test = attacker_data(paths, settings), test_set(paths)
        indices, eps = codebook_indices(vendor.codebook), settings.trace.epsilon
        share = eps / 2 * 0.8  # each reading's first peeling step
        rng = np.random.default_rng(settings.base.seed)
        cells = []
        for size in args.sizes:
            coalitions = draw_coalitions(rng, sorted(copies), size, args.trials)
            for name, steps in ATTACKS.items():
                attack = create_attack("compose", steps=steps)
                rows = []
                for trial, coalition in enumerate(coalitions):
                    model = attack([copies[c] for c in coalition], data, torch.Generator().manual_seed(settings.base.seed + trial))
                    aligned, _ = extractor.aligned(model)
                    readings = extractor.readings(aligned)
                    verdict = decide_readings(readings, vendor.codebook, indices, eps, settings.trace.scorer, settings.trace.decoder)
                    guilty = {words[c] for c in coalition}
                    accused = {a.codeword_index for a in verdict.accused}
                    rows.append({"accuracy": accuracy(model, *test), "caught": len(accused & guilty), "innocents": len(accused - guilty),
                                 **{f"ratio_{k}": best_ratio(y, vendor.codebook, indices, guilty, share) for k, y in readings.items()}})
                    print(length, margin, name, size, trial, rows[-1], flush=True)
                cells.append({"attack": name, "coalition_size": size, "trials": rows,
                              "trials_with_a_colluder_caught": sum(r["caught"] > 0 for r in rows),
                              "innocents_accused": sum(r["innocents"] for r in rows)})
    return {"code_length": length, "margin": margin, "copies": len(copies), "failures": len(jobs) - len(copies),
            "embed_seconds_per_copy": round(seconds, 2), "accuracy_drop_mean": statistics.fmean(drops), "accuracy_drop_max": max(drops),
            "cells": cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["1024:0.3", "2048:0.21"], help="LENGTH:MARGIN pairs")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results = []
    for item in args.config:
        length, margin = item.split(":")
        results.append(run_config(args.root.resolve(), int(length), float(margin), args))
    report({"benchmark": "coalition_drift", "sizes": args.sizes, "trials": args.trials, "results": results}, args.out, one_line=False)
    for r in results:
        print(f"{r['code_length']} bits, margin {r['margin']}: drop mean {r['accuracy_drop_mean']:.2f} max {r['accuracy_drop_max']:.2f} pt, "
              f"{r['embed_seconds_per_copy']} s/copy")
        for cell in r["cells"]:
            ratios = {k: [round(t[k], 2) for t in cell["trials"]] for k in cell["trials"][0] if k.startswith("ratio_")}
            print(f"  {cell['attack']} c={cell['coalition_size']}: caught {[t['caught'] for t in cell['trials']]}, "
                  f"innocents {cell['innocents_accused']}, score/threshold {ratios}")


if __name__ == "__main__":
    main()
