"""What an issued copy's accuracy costs, and what lowering it costs in steps.

Embeds the same ``--words`` random code words (both fingerprints, the issue stage's
settings, one vendor secret) once per variant of the embedding's stopping rule and
step size, and reports per variant: failures, the test-accuracy drop of every copy
against the base model (max, mean, the five largest), the embedding steps and the
seconds per copy. The variants are the knobs of ``fingerprint`` in ``params.yaml``:
``accuracy_tolerance`` (how far below the base's accuracy on the check rows a copy may
stop; negative here: it must stop above it), ``lr``, and the shared carrier space's rows
(``train_rows``, ``eval_rows``, ``natural_check``, ``subspace``: that space is built for the
variant, the base's accuracy is the same).

Needs the outputs of ``dvc repro train``; run from the repository root with the vendor
secret to use (``SECUREMARK_SECRET_FILE`` / ``SECUREMARK_VENDOR_DIR``; a fresh one is
created on first use):

    python benchmarks/issuing_accuracy.py --words 40
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import report  # noqa: E402  (sibling module: scripts run as python benchmarks/<name>.py)

OUT = Path(__file__).resolve().parent / "results" / "issuing_accuracy.json"
VARIANTS = [{}, {"accuracy_tolerance": 0.0}, {"accuracy_tolerance": -0.002}, {"lr": 0.001}, {"lr": 0.001, "accuracy_tolerance": 0.0}]


def with_overrides(cfg, overrides: dict):
    """``cfg`` with ``overrides``; a negative tolerance (stop only above the base) is
    outside what params accept, so the fields are set after validation."""
    cfg = dataclasses.replace(cfg)
    for key, value in overrides.items():
        object.__setattr__(cfg, key, value)
    return cfg


SPACE_KEYS = {"eval_rows", "train_rows", "natural_check", "subspace", "natural_views"}  # overrides that change the shared carrier space


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--words", type=int, default=40, help="code words embedded per variant (the same words for each)")
    ap.add_argument("--batch", type=int, default=20, help="copies embedded together")
    ap.add_argument("--variants", type=json.loads, default=VARIANTS, help="JSON list of fingerprint overrides")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from flows.adapters.paths import Paths
    from flows.adapters.settings import Settings
    from flows.adapters.vendor import open_vendor
    from securemark.tracing.blackbox import targets
    from securemark.embedding import Job, copy_accuracy, embed_batch
    from securemark.key import derive_seed
    from securemark.vendor import Vendor

    paths = Paths(Path.cwd().resolve())
    settings = Settings.load(paths.params)
    vendor = open_vendor(paths, settings)
    space, test_rows, test_labels = vendor.carrier_space()
    base_accuracy = copy_accuracy(space, space.base, test_rows, test_labels)
    keyset = vendor.keyset
    indices = np.random.default_rng(1).choice(len(vendor.codebook), size=args.words, replace=False)
    jobs = [Job(f"word-{i}", vendor.codebook.word(int(i)), targets(keyset, vendor.blackbox_codebook.word(int(i))),
                derive_seed(vendor.secret, f"embed|word-{i}")) for i in indices]
    rows = []
    for overrides in args.variants:
        cfg = with_overrides(vendor.config.embed, overrides)
        variant_space, variant_test = space, test_rows
        if SPACE_KEYS & set(overrides):  # rows or subspace of the shared space change: the same vendor, that space
            variant = Vendor(vendor.files, dataclasses.replace(vendor.config, embed=cfg), vendor.secret, vendor.codebook,
                             vendor.blackbox_codebook, vendor.ledger, vendor.key)
            variant_space, variant_test, _ = variant.carrier_space()
        drops, steps, marks, failures = [], [], [], 0
        start = time.perf_counter()
        for s in range(0, len(jobs), args.batch):
            for outcome in embed_batch(variant_space, jobs[s : s + args.batch], cfg):
                if outcome.error is not None:
                    failures += 1
                    continue
                drops.append((base_accuracy - copy_accuracy(variant_space, outcome.result.model, variant_test, test_labels)) * 100)
                steps.append(outcome.result.steps)
                marks.append(outcome.result.mark_steps)
        row = {"overrides": overrides, "words": args.words, "failures": failures,
               "accuracy_drop_max": max(drops, default=None), "accuracy_drop_mean": statistics.fmean(drops) if drops else None,
               "largest_drops": sorted(round(d, 2) for d in drops)[-5:], "steps_mean": statistics.fmean(steps) if steps else None,
               "steps_max": max(steps, default=None), "mark_steps_mean": statistics.fmean(marks) if marks else None,
               "seconds_per_copy": (time.perf_counter() - start) / args.words}
        print(json.dumps(row), flush=True)
        rows.append(row)
    report({"key_id": vendor.key.key_id, "base_accuracy": base_accuracy, "defaults": dataclasses.asdict(vendor.config.embed),
            "variants": rows}, args.out, one_line=False)


if __name__ == "__main__":
    main()
