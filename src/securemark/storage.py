"""Reading and writing partitions: ``images.safetensors`` plus ``manifest.csv``.

safetensors holds raw tensors only (no pickle), and writing the same tensors gives
the same bytes, which keeps DVC hashes stable across runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:  # pandas is imported where a manifest is read: tracing never needs it (~0.5 s on the CLI)
    import pandas as pd

IMAGES_FILE = "images.safetensors"
MANIFEST_FILE = "manifest.csv"


@dataclass(frozen=True)
class Partition:
    """One party's images (uint8 [N, 28, 28]) and labels (int64 [N]) read from ``directory``;
    its manifest is read when first asked for."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    directory: Path

    @cached_property
    def manifest(self) -> "pd.DataFrame":
        return read_manifest(self.directory)

    def __len__(self) -> int:
        return len(self.labels)

    def as_float(self) -> torch.Tensor:
        """Images as float32 [N, 1, 28, 28] in [0, 1], the models' input."""
        return self.images.unsqueeze(1).to(torch.float32).div_(255.0)


def write_partition(directory: Path, images: torch.Tensor, labels: torch.Tensor, manifest: "pd.DataFrame") -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(directory / IMAGES_FILE))
    manifest.to_csv(directory / MANIFEST_FILE, index=False, lineterminator="\n")


def read_manifest(directory: Path) -> "pd.DataFrame":
    import pandas as pd

    return pd.read_csv(Path(directory) / MANIFEST_FILE)


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / IMAGES_FILE))


def read_partition(directory: Path) -> Partition:
    directory = Path(directory)
    tensors = read_tensors(directory)
    return Partition(directory.name, tensors["images"], tensors["labels"], directory)
