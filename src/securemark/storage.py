"""Reading and writing partitions: ``images.safetensors`` plus ``manifest.csv``.

safetensors holds raw tensors only (no pickle), and writing the same tensors gives
the same bytes, which keeps DVC hashes stable across runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

IMAGES_FILE = "images.safetensors"
MANIFEST_FILE = "manifest.csv"


@dataclass(frozen=True)
class Partition:
    """One party's images (uint8 [N, 28, 28]), labels (int64 [N]) and manifest."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    manifest: pd.DataFrame

    def __len__(self) -> int:
        return len(self.labels)

    def as_float(self) -> torch.Tensor:
        """Images as float32 [N, 1, 28, 28] in [0, 1], the models' input."""
        return self.images.unsqueeze(1).to(torch.float32).div_(255.0)


def write_partition(directory: Path, images: torch.Tensor, labels: torch.Tensor, manifest: pd.DataFrame) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(directory / IMAGES_FILE))
    manifest.to_csv(directory / MANIFEST_FILE, index=False, lineterminator="\n")


def read_manifest(directory: Path) -> pd.DataFrame:
    return pd.read_csv(Path(directory) / MANIFEST_FILE)


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / IMAGES_FILE))


def read_partition(directory: Path) -> Partition:
    directory = Path(directory)
    tensors = read_tensors(directory)
    return Partition(directory.name, tensors["images"], tensors["labels"], read_manifest(directory))
