"""Would shorter attacker budgets make the privacy audit quicker without weakening it?

Fits the stage's strongest attackers on a variant's features (the pipeline's outputs:
``data/models``, ``data/features``, ``data/partitions``) with the budgets given, exactly as
the ``privacy_audit`` stage does (same sample, same seed), and prints the SSIM each reaches
and the seconds it took. A shorter budget is only acceptable if it reaches the stage
budget's SSIM (``metrics/privacy.json``): the audit's claim is only as strong as its attacker.

    python benchmarks/audit_budget.py --variant defended
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import report  # noqa: E402  (sibling module: scripts run as python benchmarks/<name>.py)

OUT = Path(__file__).resolve().parent / "results" / "audit_budget.json"

# (attacker, options): the stage's budgets (params.yaml) are the reference, these the shorter ones
TRIALS = [
    ("strong_decoder", {"epochs": 6, "width": 32, "blocks": 2, "ssim_weight": 0.5, "lr": 0.003}),
    ("strong_decoder", {"epochs": 6, "width": 32, "blocks": 2, "ssim_weight": 0.5, "lr": 0.004, "batch_size": 128}),
    ("fora", {"epochs": 3, "width": 32, "blocks": 1, "substitute_epochs": 2, "lr": 0.003}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="defended", choices=["defended", "undefended"])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from safetensors.torch import load_file

    from flows.adapters.jobs import split_job
    from flows.adapters.paths import Paths
    from flows.adapters.settings import Settings
    from flows.adapters.privacy import owner_sample
    from securemark.privacy import VendorView, audit
    from securemark.storage import read_partition
    from securemark.weights import load_weights

    paths = Paths.from_env()
    settings = Settings.load(paths.params)
    job = split_job(paths, settings, args.variant)
    aux = read_partition(paths.partition("aux"))
    bank = load_file(str(paths.bank(args.variant)))
    client = load_weights(paths.model(args.variant)).client
    view = VendorView(client, job.defence.sigma, aux.as_float(), aux.labels, received=bank["features"].float())
    features, labels, originals, _ = owner_sample(paths, settings, args.variant, bank)
    stage = json.loads((paths.root / "metrics" / "privacy.json").read_text())[args.variant]["attackers"]
    rows = []
    for name, options in TRIALS:
        cfg = dataclasses.replace(settings.privacy_audit, attackers={name: options})
        start = time.perf_counter()
        scores = audit(view, features, labels, originals, cfg).scores[name]
        rows.append({"attacker": name, "options": options, "ssim": round(scores["ssim"], 4), "seconds": round(time.perf_counter() - start, 1),
                     "stage_options": settings.privacy_audit.attackers[name], "stage_ssim": round(stage[name]["ssim"], 4),
                     "stage_seconds": stage[name]["seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    report({"variant": args.variant, "trials": rows}, args.out, one_line=False)


if __name__ == "__main__":
    main()
