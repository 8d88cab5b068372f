"""``prepare`` stage: split Fashion-MNIST into the parties' partitions.

Run by DVC as ``python -m flows.prepare``. Reads ``base`` and ``prepare`` params,
writes ``data/partitions/<name>/{images.safetensors,manifest.csv}`` and logs sizes
and class histograms to MLflow.
"""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.adapters import tracking
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.stage import stage_main
from securemark import data as fmnist
from securemark.partition import PartitionSpec, manifest, split
from securemark.storage import write_partition


@task(name="stage-dataset", cache_policy=NO_CACHE)
def stage_dataset(paths: Paths, source_dir: str, allow_download: bool) -> None:
    fmnist.ensure_staged(paths.raw, source_dir=source_dir, allow_download=allow_download)


@task(name="write-partitions", cache_policy=NO_CACHE)
def write_partitions(paths: Paths, spec: PartitionSpec, seed: int) -> dict[str, dict[str, int]]:
    """Split, then write each partition; returns per-partition class histograms."""
    arrays = fmnist.load(paths.raw)
    indices = split(arrays.train_labels.numpy(), arrays.test_labels.numpy(), spec, seed)
    histograms = {}
    # Start from an empty folder so that partitions of an earlier, larger K cannot linger.
    if paths.partitions.exists():
        shutil.rmtree(paths.partitions)
    for name, idx in indices.items():
        images, labels = (arrays.test_images, arrays.test_labels) if name == "test" else (arrays.train_images, arrays.train_labels)
        rows = manifest(name, idx, labels.numpy())
        index = torch.from_numpy(idx)
        write_partition(paths.partition(name), images[index], labels[index], rows)
        histograms[name] = {str(c): int(n) for c, n in zip(*np.unique(rows["label"], return_counts=True))}
    return histograms


@flow(name="prepare-partitions", log_prints=False, validate_parameters=False)
def prepare_flow(paths: Paths, settings: Settings) -> dict[str, dict[str, int]]:
    """Stage the dataset, split it, write partitions, log to MLflow."""
    logger = get_run_logger()
    stage_dataset(paths, settings.data.source_dir, settings.data.allow_download)
    with tracking.run("prepare", tracking.DATA_EXPERIMENT, paths, tags={"stage": "prepare"}):
        mlflow.log_params({"seed": settings.base.seed, **settings.flat("prepare")})
        histograms = write_partitions(paths, settings.prepare, settings.base.seed)
        mlflow.log_metrics({f"size.{name}": sum(h.values()) for name, h in histograms.items()})
        mlflow.log_dict(histograms, "class_histograms.json")
    logger.info("wrote %d partitions under %s", len(histograms), paths.partitions)
    return histograms


def main() -> None:
    stage_main(prepare_flow)


if __name__ == "__main__":
    main()
