"""How strong is the attacker-alone baseline? Its accuracy for each data budget when it
trains longer, or with crop + flip augmentation, than the recipe the
``attacker_baseline`` stage uses (the vendor's recipe, at least ``attacker.min_steps``
steps). If training longer or augmenting does not beat the stage's number, the stage
measures what the attacker can really build alone.

    python benchmarks/attacker_recipe.py --budgets 1000 2500 --steps 300 600 1200 2400
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch

from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.model import accuracy, build_model
from securemark.partition import stratified_subset
from securemark.storage import read_partition
from securemark.training import train_with_recipe

OUT = Path(__file__).resolve().parent / "results" / "attacker_recipe.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[1000, 2500])
    ap.add_argument("--steps", type=int, nargs="+", default=[300, 600, 1200, 2400])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    paths = Paths(args.root.resolve())
    settings = Settings.load(paths.params)
    attacker = read_partition(paths.partition("attacker"))
    test = read_partition(paths.partition("test"))
    rows = []
    for budget in args.budgets:
        index = torch.from_numpy(stratified_subset(attacker.labels.numpy(), budget, settings.base.seed))
        images, labels = attacker.as_float()[index], attacker.labels[index]
        for steps in args.steps:
            for augment in (False, True):
                per_epoch = math.ceil(budget / settings.train.config.batch_size)
                recipe = dataclasses.replace(settings.train.config, epochs=max(1, math.ceil(steps / per_epoch)), augment=augment)
                start = time.perf_counter()
                model = train_with_recipe(build_model(settings.model, settings.base.seed + 7919 * budget), images, labels, recipe,
                                          torch.Generator().manual_seed(settings.base.seed + budget))
                row = {"budget": budget, "steps": recipe.epochs * per_epoch, "epochs": recipe.epochs, "augment": augment,
                       "accuracy": accuracy(model, test.as_float(), test.labels), "seconds": round(time.perf_counter() - start, 1),
                       "stage_recipe": steps == settings.attacker.min_steps and not augment}
                print(row, flush=True)
                rows.append(row)
    report(rows, args.out, one_line=False)


if __name__ == "__main__":
    main()
