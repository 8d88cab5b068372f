"""``train`` stage: private split training of the base model.

``python -m flows.train`` trains the defended model (the ``defence`` params) that is
registered as ``securemark-base``; after split training the vendor recomputes the
server's batch-norm statistics from clean features of its own ``aux`` images (the
owners' features carried the defence's noise; a delivered model never sees it); ``python -m flows.train --variant undefended`` trains
the same profile with alpha = sigma = 0, the reference the privacy audit compares with.

Outputs per variant: ``data/models/<variant>.safetensors`` (weights),
``data/features/<variant>_bank.safetensors`` (the features and labels the server
received in the final epoch), ``metrics/train.json`` (defended) or
``metrics/train_undefended.json``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import save_file

from flows.adapters import tracking
from flows.adapters.jobs import split_job
from flows.adapters.model_registry import BASE_MODEL, log_classifier
from flows.adapters.paths import VARIANTS, Paths
from flows.adapters.settings import Settings
from flows.adapters.stage import stage_main
from securemark.model import accuracy
from securemark.split.protocol import SplitJob
from securemark.split.transport import create_transport
from securemark.training import recalibrate_norms
from securemark.storage import read_partition
from securemark.weights import save_weights


EPOCH_EVAL_IMAGES = 2000


@task(name="split-train", cache_policy=NO_CACHE)
def run_training(job: SplitJob, transport: str, test_images: torch.Tensor, test_labels: torch.Tensor):
    logger = get_run_logger()

    def on_epoch(epoch: int, model, stats: dict) -> None:
        # progress on a fixed sample of the test set (the full set is scored once, at the end)
        stats["test_accuracy_sample"] = accuracy(model, test_images[:EPOCH_EVAL_IMAGES], test_labels[:EPOCH_EVAL_IMAGES])
        model.train()
        mlflow.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch)
        logger.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in stats.items()})

    result = create_transport(transport).train(job, on_epoch=on_epoch)
    if transport != "inprocess":  # epochs were not observable in this process
        for stats in result.history:
            mlflow.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=stats["epoch"])
    return result


@flow(name="split-training", validate_parameters=False)
def train_flow(paths: Paths, settings: Settings, variant: str = "defended") -> dict:
    """Train the split model on the owners' partitions, evaluate, save, log, register."""
    logger = get_run_logger()
    job = split_job(paths, settings, variant)
    transport = settings.train.transport
    test = read_partition(paths.partition("test"))
    test_x, test_y = test.as_float(), test.labels
    with tracking.run(f"train-{variant}", tracking.TRAIN_EXPERIMENT, paths, tags={"stage": "train", "variant": variant}) as run:
        mlflow.log_params(
            {
                "variant": variant,
                "transport": transport,
                "owners": job.owners,
                **{f"model.{k}": v for k, v in asdict(job.spec).items()},
                **{f"train.{k}": v for k, v in asdict(job.train).items()},
                **{f"defence.{k}": v for k, v in asdict(job.defence).items()},
            }
        )
        start = time.perf_counter()
        result = run_training(job, transport, test_x, test_y)
        # the vendor's own last step: server batch-norm statistics from clean features of its aux images
        recalibrate_norms(result.model, result.model.server, read_partition(paths.partition("aux")).as_float())
        seconds = time.perf_counter() - start
        test_accuracy = accuracy(result.model, test_x, test_y)
        weights = save_weights(result.model, paths.model(variant))
        bank_file = paths.bank(variant)
        bank_file.parent.mkdir(parents=True, exist_ok=True)
        save_file(result.bank, str(bank_file))
        metrics = {"test_accuracy": test_accuracy, "epochs": job.train.epochs, "seconds": round(seconds, 2), "owners": job.owners}
        mlflow.log_metrics({"final_test_accuracy": test_accuracy, "seconds": seconds})
        if variant == "defended":
            version = log_classifier(weights, BASE_MODEL, tags={"run_id": run.info.run_id, "variant": variant})
            metrics["model_version"] = int(version.version)
            logger.info("registered %s version %s (models:/%s@latest)", BASE_MODEL, version.version, BASE_MODEL)
        else:
            log_classifier(weights)
        tracking.write_json(metrics, paths.train_metrics(variant))
    logger.info("%s model: test accuracy %.4f in %.1f s", variant, test_accuracy, seconds)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="defended")
    args = parser.parse_args(argv)
    stage_main(lambda paths, settings: train_flow(paths, settings, args.variant))


if __name__ == "__main__":
    main()
