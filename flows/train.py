"""``train`` stage: private split training of the base model.

``python -m flows.train`` trains the defended model (the ``defence`` params) that is
registered as ``securemark-base``; ``python -m flows.train --variant undefended`` trains
the same profile with alpha = sigma = 0, the reference the privacy audit compares with.

Outputs per variant: ``data/models/<variant>.safetensors`` (weights),
``data/features/<variant>_bank.safetensors`` (the features and labels the server
received in the final epoch), ``metrics/train.json`` (defended) or
``metrics/train_undefended.json``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import save_file

from flows import tracking
from flows.entry import stage_main
from flows.project import Paths, build, section
from flows.registry import BASE_MODEL, log_classifier
from securemark.model import ModelSpec, accuracy
from securemark.partition import PartitionSpec
from securemark.split.defence import DefenceConfig
from securemark.split.protocol import SplitJob, TrainConfig
from securemark.split.transport import create_transport
from securemark.storage import read_partition
from securemark.weights import save_weights

VARIANTS = ("defended", "undefended")


@dataclass(frozen=True)
class OwnerPartitions:
    """Loads owner k's partition from disk; each owner process reads only its own."""

    partitions: Path

    def __call__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = read_partition(self.partitions / f"owner_{k}")
        return part.as_float(), part.labels


def model_path(paths: Paths, variant: str) -> Path:
    return paths.models / f"{variant}.safetensors"


def bank_path(paths: Paths, variant: str) -> Path:
    return paths.features / f"{variant}_bank.safetensors"


def metrics_path(paths: Paths, variant: str) -> Path:
    return paths.metrics / ("train.json" if variant == "defended" else f"train_{variant}.json")


def make_job(paths: Paths, params: dict, variant: str) -> SplitJob:
    """The split-training job the params describe (shared with the gloo worker)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    seed = int(section(params, "base")["seed"])
    spec = build(ModelSpec, params, "model")
    cfg = build(TrainConfig, params, "train", exclude=("transport",), seed=seed)
    defence = build(DefenceConfig, params, "defence") if variant == "defended" else DefenceConfig()
    partitions = build(PartitionSpec, params, "prepare")
    sizes = tuple(len(read_partition(paths.partition(n)).labels) for n in partitions.owner_names)
    return SplitJob(spec, cfg, defence, sizes, OwnerPartitions(paths.partitions))


@task(name="split-train", cache_policy=NO_CACHE)
def run_training(job: SplitJob, transport: str, test_images: torch.Tensor, test_labels: torch.Tensor):
    logger = get_run_logger()

    def on_epoch(epoch: int, model, stats: dict) -> None:
        stats["test_accuracy"] = accuracy(model, test_images, test_labels)
        mlflow.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch)
        logger.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in stats.items()})

    result = create_transport(transport).train(job, on_epoch=on_epoch)
    if transport != "inprocess":  # epochs were not observable in this process
        for stats in result.history:
            mlflow.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=stats["epoch"])
    return result


@flow(name="split-training")
def train_flow(paths: Paths, params: dict, variant: str = "defended") -> dict:
    """Train the split model on the owners' partitions, evaluate, save, log, register."""
    logger = get_run_logger()
    job = make_job(paths, params, variant)
    transport = section(params, "train").get("transport", "inprocess")
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
        seconds = time.perf_counter() - start
        test_accuracy = accuracy(result.model, test_x, test_y)
        weights = save_weights(result.model, model_path(paths, variant))
        bank_file = bank_path(paths, variant)
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
        tracking.write_json(metrics, metrics_path(paths, variant))
    logger.info("%s model: test accuracy %.4f in %.1f s", variant, test_accuracy, seconds)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="defended")
    args = parser.parse_args(argv)
    stage_main(lambda paths, params: train_flow(paths, params, args.variant))


if __name__ == "__main__":
    main()
