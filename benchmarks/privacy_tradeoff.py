"""Defence frontier: accuracy against leakage beyond the labels, for the whole zoo.

For each setting (where the cut sits, a client bottleneck, the server's dense blocks,
NoPeek alpha, noise sigma, the simulated attacker's weight, the recipe's epochs and
augmentation): split-train in-process on the owner partitions, let the vendor
recalibrate the server's norms on ``aux`` (as the ``train`` stage does), then run every
attacker of the zoo against the features the owners would send for a fixed sample of
their images, and compute the certified bound (dFIL) under the setting's noise. Trained
models are cached in ``benchmarks/.cache/privacy/`` (keyed by setting and seed), so the
zoo can be re-run or extended without training again. Prints one JSON line per setting
and saves the list to ``benchmarks/results/privacy_tradeoff.json``.

    python benchmarks/privacy_tradeoff.py --zoo converged \\
        --settings cut=1,alpha=0,sigma=0 cut=2,bottleneck=16,hidden=512/256,sigma=0.5

A setting is comma-separated ``key=value`` pairs over ``cut``, ``bottleneck``,
``hidden`` (``/``-separated), ``alpha``, ``sigma``, ``adversary``, ``tau``, ``epochs``,
``augment`` (0/1) and ``lr``; unset keys come from params (``model``, ``defence``,
``train``). ``--zoo params`` audits with the stage's (budgeted) zoo; ``--zoo
converged`` with attackers trained until their held-out SSIM stops improving, plus
``fora`` and ``prior_inversion``: the claim is made against that one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
from securemark.privacy.fisher import fisher_bound
from securemark.split.protocol import SplitJob
from securemark.split.transport import create_transport
from securemark.storage import read_partition
from securemark.training import recalibrate_norms
from securemark.weights import load_weights, save_weights

CACHE = Path("benchmarks/.cache/privacy")

# The zoo the frontier is judged by: every trained attacker runs until its held-out SSIM
# has not improved for `patience` epochs (capped at `epochs`), and the prior-aware ones join.
CONVERGED_ZOO = {
    "decoder": {"epochs": 40, "patience": 4},
    "strong_decoder": {"epochs": 80, "patience": 5, "width": 64, "blocks": 2, "ssim_weight": 0.5},
    "fora": {"epochs": 80, "patience": 5, "substitute_epochs": 10},
    "inversion": {"steps": 300, "lr": 0.05, "tv": 0.02},
    "prior_inversion": {"steps": 300, "prior_epochs": 30},
    "label_floor": {},
}

MODEL_KEYS = {"cut": int, "bottleneck": int, "hidden": lambda v: tuple(int(h) for h in v.split("/"))}
DEFENCE_KEYS = {"alpha": float, "sigma": float, "adversary": float, "tau": float}
TRAIN_KEYS = {"epochs": int, "augment": lambda v: bool(int(v)), "lr": float}


def parse_setting(text: str) -> dict:
    """``"cut=2,bottleneck=16,sigma=0.5"`` -> {"cut": 2, "bottleneck": 16, "sigma": 0.5}."""
    known = MODEL_KEYS | DEFENCE_KEYS | TRAIN_KEYS
    out = {}
    for pair in filter(None, text.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"privacy_tradeoff: bad setting {pair!r} in {text!r}; keys: {sorted(known)}")
        out[key] = known[key](value)
    return out


def build(settings: Settings, setting: dict):
    """The model spec, defence and recipe of one setting (params where it is silent)."""
    model = {k: v for k, v in setting.items() if k in MODEL_KEYS}
    if model.get("bottleneck") and "cut" not in model:
        model["cut"] = len(settings.model.widths)
    spec = dataclasses.replace(settings.model, **model)
    defence = dataclasses.replace(settings.defence, **{k: v for k, v in setting.items() if k in DEFENCE_KEYS})
    recipe = dataclasses.replace(settings.train.config, **{k: v for k, v in setting.items() if k in TRAIN_KEYS})
    return spec, defence, recipe


def trained_model(spec, defence, recipe, sizes, loader, aux):
    """The split-trained, norm-recalibrated model of a setting (from the cache when there)."""
    key = json.dumps({"spec": spec.to_dict(), "defence": dataclasses.asdict(defence), "recipe": dataclasses.asdict(recipe),
                      "sizes": list(sizes)}, sort_keys=True, default=str)
    path = CACHE / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.exists():
        return load_weights(path), None
    start = time.perf_counter()
    job = SplitJob(spec, recipe, defence, sizes, loader, record_bank=False)
    model = create_transport("inprocess").train(job, progress=True).model
    recalibrate_norms(model, model.server, aux.as_float())
    seconds = round(time.perf_counter() - start, 1)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)
    return model, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--partitions", type=Path, default=Path("data/partitions"))
    ap.add_argument("--settings", nargs="+", default=["cut=1,alpha=0,sigma=0"], help="key=value,... (see the module doc)")
    ap.add_argument("--zoo", choices=["params", "converged"], default="converged")
    ap.add_argument("--train-only", action="store_true", help="train (and cache) the settings' models, audit nothing")
    ap.add_argument("--sample", type=int, default=500, help="owner images scored")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_tradeoff.json"))
    args = ap.parse_args()

    settings = Settings.load(args.params)
    zoo = None
    if not args.train_only:
        zoo = dataclasses.replace(settings.privacy_audit, attackers=CONVERGED_ZOO) if args.zoo == "converged" else settings.privacy_audit
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
        setting = parse_setting(text)
        spec, defence, recipe = build(settings, setting)
        start = time.perf_counter()
        model, train_seconds = trained_model(spec, defence, recipe, sizes, loader, aux)
        test_accuracy = accuracy(model, test.as_float(), test.labels)
        print(json.dumps({"setting": text, "test_accuracy": round(test_accuracy, 4), "train_seconds": train_seconds}), flush=True)
        if args.train_only:
            continue
        noise = torch.Generator().manual_seed(settings.base.seed + 7)
        received = smash(model.client, sample, defence.sigma, noise)
        # the vendor holds every feature the owners sent: here, what they send for their whole partitions
        bank = torch.cat([smash(model.client, images, defence.sigma, noise) for images, _ in owned])
        view = VendorView(model.client, defence.sigma, aux.as_float(), aux.labels, received=bank)
        result = audit(view, received, labels, sample, zoo)
        bound = fisher_bound(model.client, sample, defence.sigma)
        row = {"setting": text, "model": spec.to_dict(), "defence": dataclasses.asdict(defence),
               "epochs": recipe.epochs, "augment": recipe.augment, "lr": recipe.lr,
               "test_accuracy": test_accuracy, "accuracy": test_accuracy, "leakage": result.leakage,
               "strongest": result.strongest, "label_floor_ssim": result.floor_ssim, "feature_dcor": result.feature_dcor,
               "attackers": {name: {k: round(v, 4) for k, v in s.items()} for name, s in result.scores.items()},
               **bound.summary(), "zoo": zoo.attackers, "train_seconds": train_seconds,
               "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if rows:
        report(rows, args.out, one_line=False)


if __name__ == "__main__":
    main()
