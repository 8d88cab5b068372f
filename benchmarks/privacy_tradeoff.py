"""Defence trade-off table: NoPeek alpha and noise sigma against accuracy and leakage.

For each (alpha, sigma): split-train in-process on the owner partitions, then run the
adaptive decoder attack (trained on ``aux`` through the defended client, noise included)
on a fixed sample of owner images. Prints one JSON line per setting and saves the table
to ``benchmarks/results/privacy_tradeoff.json``.

    python benchmarks/privacy_tradeoff.py --alphas 0 1 3 --sigmas 0 0.5 1 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flows.adapters.jobs import OwnerPartitions
from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.model import ModelSpec, accuracy
from securemark.privacy import AuditConfig, reconstruction_scores, smash, train_decoder
from securemark.split.defence import DefenceConfig
from securemark.split.protocol import SplitJob, TrainConfig
from securemark.split.transport import create_transport
from securemark.storage import read_partition


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", type=Path, default=Path("data/partitions"))
    ap.add_argument("--owners", type=int, default=3)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--decoder-epochs", type=int, default=8)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_tradeoff.json"))
    args = ap.parse_args()

    spec = ModelSpec(widths=tuple(args.widths), cut=args.cut)
    loader = OwnerPartitions(args.partitions)
    sizes = tuple(len(read_partition(args.partitions / f"owner_{k}").labels) for k in range(1, args.owners + 1))
    test = read_partition(args.partitions / "test")
    aux = read_partition(args.partitions / "aux").as_float()
    sample = torch.cat([loader(k)[0][:200] for k in range(1, args.owners + 1)])
    audit = AuditConfig(decoder_epochs=args.decoder_epochs, seed=args.seed)
    rows = []
    for alpha in args.alphas:
        for sigma in args.sigmas:
            start = time.perf_counter()
            job = SplitJob(spec, TrainConfig(epochs=args.epochs, seed=args.seed), DefenceConfig(alpha, sigma), sizes, loader, record_bank=False)
            model = create_transport("inprocess").train(job, progress=False).model
            g = torch.Generator().manual_seed(args.seed)
            decoder = train_decoder(smash(model.client, aux, sigma, g), aux, audit)
            scores, _ = reconstruction_scores(decoder, smash(model.client, sample, sigma, g), sample)
            row = {"alpha": alpha, "sigma": sigma, "test_accuracy": accuracy(model, test.as_float(), test.labels), **scores,
                   "widths": list(spec.widths), "cut": spec.cut, "epochs": args.epochs, "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    report(rows, args.out, one_line=False)


if __name__ == "__main__":
    main()
