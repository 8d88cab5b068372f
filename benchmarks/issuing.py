"""Issuing: does every customer word embed, how fast, and at what accuracy cost?

Part 1 (embedding, no registry): for each of ``--secrets`` fresh vendor secrets (a new
secret file and vendor state each, as on a fresh machine), draws ``--words`` random
code-word indices from that vendor's codebook and embeds them in a rolling batch of
``--batch`` (the issue stage's ``issue.batch``) with the issue stage's settings (both
fingerprints). Counts failures, and reports the steps, the embedding seconds per copy and every copy's test-accuracy drop
against the base model.

Part 2 (``--registered N``): the issue flow itself (Prefect, MLflow on a temporary
SQLite store, ledger, files) for N customers under one more fresh secret, in a
temporary project that links the pipeline's data: wall seconds per copy with
registration, set-up apart.

Needs the outputs of ``dvc repro train`` (base model, feature bank, partitions); run
from the repository root:

    python benchmarks/issuing.py --secrets 5 --words 100 --registered 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import report  # noqa: E402  (sibling module: scripts run as python benchmarks/<name>.py)

OUT = Path(__file__).resolve().parent / "results" / "issuing.json"


def embed_words(root: Path, words: int, batch: int, seed: int) -> dict:
    """Part 1 for one fresh secret (the caller has pointed the vendor at fresh state)."""
    from flows.adapters.paths import Paths
    from flows.adapters.settings import Settings
    from flows.adapters.vendor import open_vendor
    from securemark.tracing.blackbox import targets
    from securemark.embedding import Job, copy_accuracy, embed_batch
    from securemark.key import derive_seed

    paths = Paths(root)
    settings = Settings.load(paths.params)
    vendor = open_vendor(paths, settings)
    start = time.perf_counter()
    space, test_rows, test_labels = vendor.carrier_space()
    setup = time.perf_counter() - start
    base_accuracy = copy_accuracy(space, space.base, test_rows, test_labels)
    keyset = vendor.keyset if settings.blackbox.enabled else None
    indices = np.random.default_rng(seed).choice(len(vendor.codebook), size=words, replace=False)
    rows, failures = [], []
    start = time.perf_counter()
    jobs = [Job(f"word-{i}", vendor.codebook.word(int(i)),
                None if keyset is None else targets(keyset, vendor.blackbox_codebook.word(int(i))),
                derive_seed(vendor.secret, f"embed|word-{i}")) for i in indices]
    finished = []

    def progress(count: int) -> None:
        finished.append(count)
        if sum(finished) % batch < count or sum(finished) == words:
            print(f"  {sum(finished)}/{words} words, {time.perf_counter() - start:.0f} s", flush=True)

    for outcome in embed_batch(space, jobs, vendor.config.embed, progress=progress, width=batch):  # a rolling batch of `batch`
        if outcome.error is not None:
            failures.append(str(outcome.error))
            continue
        r = outcome.result
        rows.append({"steps": r.steps, "mark_steps": r.mark_steps, "ber": r.ber, "min_margin": r.min_margin, "key_agreement": r.key_agreement,
                     "drop_pt": (base_accuracy - copy_accuracy(space, r.model, test_rows, test_labels)) * 100})
    seconds = time.perf_counter() - start
    drops = [r["drop_pt"] for r in rows]
    return {"key_id": vendor.key.key_id, "words": words, "failures": len(failures), "failure_messages": failures[:5],
            "setup_seconds": setup, "seconds_per_copy": seconds / words, "base_accuracy": base_accuracy,
            "accuracy_drop_max": max(drops, default=None), "accuracy_drop_mean": statistics.fmean(drops) if drops else None,
            "steps_max": max((r["steps"] for r in rows), default=None), "steps_mean": statistics.fmean(r["steps"] for r in rows) if rows else None,
            # where the steps go: until both marks hold, then restoring accuracy
            "mark_steps_mean": statistics.fmean(r["mark_steps"] for r in rows) if rows else None,
            "mark_steps_max": max((r["mark_steps"] for r in rows), default=None),
            "ber_max": max((r["ber"] for r in rows), default=None), "margin_min": min((r["min_margin"] for r in rows), default=None),
            "key_agreement_min": min((r["key_agreement"] for r in rows if r["key_agreement"] is not None), default=None)}


def linked_project(root: Path, into: Path) -> Path:
    """A scratch project that sees the pipeline's inputs (links) and has its own outputs."""
    for part in ("params.yaml", "data/partitions", "data/models", "data/features"):
        target = into / part
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(root / part)
    return into


def registered(root: Path, customers: int) -> dict:
    """Part 2: the issue flow for ``customers`` customers (fresh secret, store, ledger)."""
    from flows.adapters import tracking
    from flows.adapters.model_registry import BASE_MODEL, log_classifier
    from flows.adapters.paths import Paths
    from flows.adapters.settings import Settings
    from flows.issue import fingerprint_metrics, run_issue

    with tempfile.TemporaryDirectory(prefix="securemark-issuing-") as tmp:
        project = linked_project(root, Path(tmp) / "project")
        os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", SECUREMARK_SECRET_FILE=str(Path(tmp) / "secret.key"),
                          SECUREMARK_VENDOR_DIR=str(Path(tmp) / "vendor"))
        paths = Paths(project)
        settings = Settings.load(paths.params)
        with tracking.run("base", tracking.TRAIN_EXPERIMENT, paths):  # the flow issues from the registered base (@latest)
            log_classifier(paths.base_model, BASE_MODEL)
        ids = [f"bench-{i:05d}" for i in range(customers)]
        start = time.perf_counter()
        rows = run_issue(paths, settings, ids)
        wall = time.perf_counter() - start
        metrics = fingerprint_metrics(rows, 0, wall)
    return {"copies": len(rows), **{k: metrics[k] for k in ("seconds_per_copy_with_registration", "setup_seconds", "wall_seconds",
                                                            "seconds_per_copy", "accuracy_drop_max")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--secrets", type=int, default=5, help="fresh vendor secrets")
    ap.add_argument("--words", type=int, default=100, help="random code words embedded per secret")
    ap.add_argument("--batch", type=int, default=20, help="copies embedded together")
    ap.add_argument("--registered", type=int, default=50, help="customers issued through the flow with registration (0: skip)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--merge", action="store_true", help="keep part 1's numbers already in --out (run part 2 alone with --secrets 0)")
    args = ap.parse_args()
    root = Path.cwd().resolve()
    per_secret = []
    for k in range(args.secrets):
        with tempfile.TemporaryDirectory(prefix="securemark-secret-") as tmp:
            os.environ.update(SECUREMARK_SECRET_FILE=str(Path(tmp) / "secret.key"), SECUREMARK_VENDOR_DIR=str(Path(tmp) / "vendor"))
            print(f"secret {k + 1}/{args.secrets}", flush=True)
            per_secret.append(embed_words(root, args.words, args.batch, seed=k))
            print(f"  {per_secret[-1]}", flush=True)
    result = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    if per_secret:
        result = {
        "words": sum(r["words"] for r in per_secret), "secrets": len(per_secret), "failures": sum(r["failures"] for r in per_secret),
        "seconds_per_copy": statistics.fmean(r["seconds_per_copy"] for r in per_secret) if per_secret else None,
        "accuracy_drop_max": max((r["accuracy_drop_max"] for r in per_secret if r["accuracy_drop_max"] is not None), default=None),
        "accuracy_drop_mean": statistics.fmean(r["accuracy_drop_mean"] for r in per_secret if r["accuracy_drop_mean"] is not None) if per_secret else None,
        "per_secret": per_secret, "batch": args.batch,
        }
        report(result, args.out, one_line=False)  # part 1 is saved before part 2 runs
    if args.registered:
        flow = registered(root, args.registered)
        result.update(registered_copies=flow["copies"], seconds_per_copy_with_registration=flow["seconds_per_copy_with_registration"],
                      registered_setup_seconds=flow["setup_seconds"], registered_wall_seconds=flow["wall_seconds"],
                      registered_seconds_per_copy_embedding=flow["seconds_per_copy"])  # that secret's words: the rest is registration and files
    report(result, args.out, one_line=False)
    print({k: v for k, v in result.items() if k != "per_secret"})


if __name__ == "__main__":
    main()
