"""``attacker_baseline`` stage: what the attacker builds alone, per data budget.

For every budget in ``attacker.budgets``, a class-balanced subset of the ``attacker``
partition of that size (nested: each budget's images include the smaller ones') trains
the vendor's own architecture from scratch with the vendor's own recipe (the ``train``
settings: optimiser, schedule, label smoothing, augmentation), for at least
``attacker.min_steps`` optimisation steps (so a small budget is trained as long as it
can profit from, not for a fixed number of passes). Test accuracy goes to
``metrics/attacker_baseline.json`` (a list of ``{budget, accuracy, epochs, steps,
seconds}``) and the models to ``data/models/attacker_alone/<budget>.safetensors``:
independently trained models, which the trace stage also uses as null models.

An attack is *worth it* only if the attacked model beats the attacker-alone accuracy at
the budget the attack used (``attacker.budget``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import time

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from flows.adapters import tracking
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.stage import stage_main
from securemark.model import accuracy, build_model
from securemark.partition import stratified_subset
from securemark.storage import read_partition
from securemark.training import Recipe, train_with_recipe
from securemark.weights import save_weights


def budget_recipe(recipe: Recipe, images: int, min_steps: int) -> Recipe:
    """The vendor's recipe for ``images`` training images: its epochs, or more when they
    would give fewer than ``min_steps`` optimisation steps."""
    per_epoch = math.ceil(images / recipe.batch_size)
    return dataclasses.replace(recipe, epochs=max(recipe.epochs, math.ceil(min_steps / per_epoch)))


@task(name="attacker-alone", cache_policy=NO_CACHE, task_run_name="attacker-alone-{budget}")
def train_alone(paths: Paths, settings: Settings, budget: int, images: torch.Tensor, labels: torch.Tensor,
                test: tuple[torch.Tensor, torch.Tensor]) -> dict:
    recipe = budget_recipe(settings.train.config, budget, settings.attacker.min_steps)
    start = time.perf_counter()
    model = build_model(settings.model, settings.base.seed + 7919 * budget)  # another initialisation than the vendor's
    train_with_recipe(model, images, labels, recipe, torch.Generator().manual_seed(settings.base.seed + budget),
                      progress=lambda it: tqdm(it, desc=f"attacker alone ({budget} images)", unit="epoch", leave=False))
    save_weights(model, paths.attacker_alone_model(budget))
    steps = recipe.epochs * math.ceil(budget / recipe.batch_size)
    return {"budget": budget, "accuracy": accuracy(model, *test), "epochs": recipe.epochs, "steps": steps,
            "seconds": round(time.perf_counter() - start, 1)}


@flow(name="attacker-baseline", validate_parameters=False)
def attacker_baseline_flow(paths: Paths, settings: Settings) -> list[dict]:
    logger = get_run_logger()
    attacker = read_partition(paths.partition("attacker"))
    test_part = read_partition(paths.partition("test"))
    test = (test_part.as_float(), test_part.labels)
    if paths.attacker_alone.exists():  # models of budgets no longer in params must not linger
        shutil.rmtree(paths.attacker_alone)
    rows = []
    with tracking.run("attacker-baseline", tracking.TRAIN_EXPERIMENT, paths, tags={"stage": "attacker_baseline"}):
        mlflow.log_params({**settings.flat("attacker"), **settings.flat("model")})
        for budget in settings.attacker.budgets:
            index = torch.from_numpy(stratified_subset(attacker.labels.numpy(), budget, settings.base.seed))
            row = train_alone(paths, settings, budget, attacker.as_float()[index], attacker.labels[index], test)
            mlflow.log_metrics({"accuracy": row["accuracy"], "epochs": row["epochs"]}, step=budget)
            logger.info("attacker alone with %d images: accuracy %.4f (%d epochs, %.0f s)", budget, row["accuracy"], row["epochs"], row["seconds"])
            rows.append(row)
        mlflow.log_dict(rows, "attacker_baseline.json")
    return rows


def _stage(paths: Paths, settings: Settings) -> None:
    tracking.write_json(attacker_baseline_flow(paths, settings), paths.attacker_baseline)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="attacker_baseline stage: the vendor's recipe on the attacker's data, per budget").parse_args(argv)
    stage_main(_stage)


if __name__ == "__main__":
    main()
