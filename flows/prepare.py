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

from flows import tracking
from flows.entry import stage_main
from flows.project import Paths, build, section
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


@flow(name="prepare-partitions", log_prints=False)
def prepare_flow(paths: Paths, params: dict) -> dict[str, dict[str, int]]:
    """Stage the dataset, split it, write partitions, log to MLflow."""
    logger = get_run_logger()
    spec = build(PartitionSpec, params, "prepare")  # raises ConfigError before any work
    base = section(params, "base")
    data_params = params.get("data", {})
    stage_dataset(paths, data_params.get("source_dir", str(fmnist.DEBIAN_DATASET_DIR)), bool(data_params.get("allow_download", False)))
    with tracking.run("prepare", tracking.DATA_EXPERIMENT, paths, tags={"stage": "prepare"}):
        mlflow.log_params({"seed": base["seed"], **{f"prepare.{k}": v for k, v in section(params, "prepare").items()}})
        histograms = write_partitions(paths, spec, int(base["seed"]))
        mlflow.log_metrics({f"size.{name}": sum(h.values()) for name, h in histograms.items()})
        mlflow.log_dict(histograms, "class_histograms.json")
    logger.info("wrote %d partitions under %s", len(histograms), paths.partitions)
    return histograms


def _run(paths: Paths, params: dict) -> None:
    build(PartitionSpec, params, "prepare")  # reject impossible params before Prefect starts
    prepare_flow(paths, params)


def main() -> None:
    stage_main(_run)


if __name__ == "__main__":
    main()
