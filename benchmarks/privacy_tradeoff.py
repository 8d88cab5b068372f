"""Defence trade-off table: accuracy against leakage beyond the labels, for the full zoo.

For each setting (cut, NoPeek alpha, noise sigma, simulated-attacker weight): split-train
in-process on the owner partitions with the profile's recipe (epochs overridable), let
the vendor recalibrate the server's norms on ``aux`` (as the ``train`` stage does), then
run every attacker of the profile's ``privacy_audit`` zoo against the features the
owners would send for a fixed sample of their images. Prints one JSON line per setting
and saves the table to ``benchmarks/results/privacy_tradeoff.json``.

    python benchmarks/privacy_tradeoff.py --settings 1,2,0.5,0 2,0,1,0 2,2,1,0.5 --epochs 3

A setting is ``cut,alpha,sigma,adversary`` (``tau`` and the simulator's width come from
params, or ``--tau``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from results_io import (
    report,  # sibling module: scripts run as python benchmarks/<name>.py
)

from flows.adapters.jobs import OwnerPartitions
from flows.adapters.settings import Settings
from securemark.model import accuracy
from securemark.privacy import VendorView, audit, smash
from securemark.split.protocol import SplitJob
from securemark.split.transport import create_transport
from securemark.storage import read_partition
from securemark.training import recalibrate_norms


def parse_setting(text: str) -> tuple[int, float, float, float]:
    cut, alpha, sigma, adversary = text.split(",")
    return int(cut), float(alpha), float(sigma), float(adversary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--partitions", type=Path, default=Path("data/partitions"))
    ap.add_argument("--settings", nargs="+", default=["1,0,0,0", "1,2,0.5,0"], help="cut,alpha,sigma,adversary")
    ap.add_argument("--tau", type=float, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (screening)")
    ap.add_argument("--sample", type=int, default=500, help="owner images scored")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_tradeoff.json"))
    args = ap.parse_args()

    settings = Settings.load(args.params)
    recipe = settings.train.config if args.epochs is None else dataclasses.replace(settings.train.config, epochs=args.epochs)
    loader = OwnerPartitions(args.partitions)
    names = settings.prepare.owner_names
    sizes = tuple(len(read_partition(args.partitions / n).labels) for n in names)
    test = read_partition(args.partitions / "test")
    aux = read_partition(args.partitions / "aux")
    per_owner = args.sample // len(names) + 1
    owned = [loader(k) for k in range(1, len(names) + 1)]
    sample = torch.cat([images[:per_owner] for images, _ in owned])[: args.sample]
    labels = torch.cat([lab[:per_owner] for _, lab in owned])[: args.sample]
    rows = []
    for text in args.settings:
        cut, alpha, sigma, adversary = parse_setting(text)
        defence = dataclasses.replace(settings.defence, alpha=alpha, sigma=sigma, adversary=adversary,
                                      **({} if args.tau is None else {"tau": args.tau}))
        spec = dataclasses.replace(settings.model, cut=cut)
        start = time.perf_counter()
        job = SplitJob(spec, recipe, defence, sizes, loader, record_bank=False)
        model = create_transport("inprocess").train(job, progress=False).model
        recalibrate_norms(model, model.server, aux.as_float())
        trained = time.perf_counter() - start
        received = smash(model.client, sample, sigma, torch.Generator().manual_seed(settings.base.seed + 7))
        view = VendorView(model.client, sigma, aux.as_float(), aux.labels)
        result = audit(view, received, labels, sample, settings.privacy_audit)
        row = {"cut": cut, "alpha": alpha, "sigma": sigma, "adversary": adversary, "tau": defence.tau,
               "test_accuracy": accuracy(model, test.as_float(), test.labels), "leakage": result.leakage,
               "strongest": result.strongest, "label_floor_ssim": result.floor_ssim, "feature_dcor": result.feature_dcor,
               "attackers": {name: {k: round(v, 4) for k, v in s.items()} for name, s in result.scores.items()},
               "zoo": settings.privacy_audit.attackers, "epochs": recipe.epochs, "train_seconds": round(trained, 1), "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    report(rows, args.out, one_line=False)


if __name__ == "__main__":
    main()
