"""Fashion-MNIST, read through torchvision.

The raw files come either from Debian's ``dataset-fashion-mnist`` package (offline)
or from torchvision's own download. Either way torchvision parses them; SecureMark
only puts the compressed files where torchvision expects them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from securemark.errors import DatasetMissingError

log = logging.getLogger(__name__)

DEBIAN_DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET_IT = (
    "Install it with `apt-get update && apt-get install -y dataset-fashion-mnist` "
    f"(files land in {DEBIAN_DATASET_DIR}), or run `make data` on a machine with internet "
    "access to let torchvision download it."
)
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # torchvision's FashionMNIST.classes
NUM_CLASSES = len(CLASSES)
IMAGE_SHAPE = (28, 28)
# Sizes of the extracted IDX files. Debian recompresses the archives, so the .gz MD5
# sums torchvision knows do not apply; the extracted sizes do.
EXTRACTED_SIZES = {
    "train-images-idx3-ubyte": 47_040_016,
    "train-labels-idx1-ubyte": 60_008,
    "t10k-images-idx3-ubyte": 7_840_016,
    "t10k-labels-idx1-ubyte": 10_008,
}


@dataclass(frozen=True)
class FashionMNISTArrays:
    """The whole dataset as tensors: images uint8 [N, 28, 28], labels int64 [N]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _raw_folder(root: Path) -> Path:
    return Path(root) / "FashionMNIST" / "raw"  # where torchvision's FashionMNIST looks


def is_staged(root: Path) -> bool:
    """True when torchvision finds all four extracted files under ``root``."""
    raw = _raw_folder(root)
    return all((raw / name).is_file() and (raw / name).stat().st_size == size for name, size in EXTRACTED_SIZES.items())


def stage_from_directory(source_dir: Path, root: Path) -> Path:
    """Extract the four ``.gz`` files in ``source_dir`` into ``root/FashionMNIST/raw``
    with torchvision and check the extracted sizes. Returns the raw folder."""
    source_dir = Path(source_dir)
    raw = _raw_folder(root)
    raw.mkdir(parents=True, exist_ok=True)
    # torchvision is imported where used: it costs seconds at start-up, and the CLI never needs it
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import extract_archive

    for url, _ in FashionMNIST.resources:
        archive = source_dir / Path(url).name
        if not archive.is_file():
            raise DatasetMissingError(f"Fashion-MNIST file {archive} is missing. {HOW_TO_GET_IT}")
        extracted = Path(extract_archive(str(archive), str(raw)))
        size, expected = extracted.stat().st_size, EXTRACTED_SIZES[extracted.name]
        if size != expected:
            extracted.unlink()
            raise DatasetMissingError(f"{archive} extracts to {size} bytes, expected {expected}; it is corrupt.")
    log.info("Fashion-MNIST staged from %s into %s", source_dir, raw)
    return raw


def download(root: Path) -> Path:
    """Let torchvision download Fashion-MNIST (needs internet)."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)
    return _raw_folder(root)


def ensure_staged(root: Path, source_dir: Path = DEBIAN_DATASET_DIR, allow_download: bool = False) -> Path:
    """Make sure torchvision can read Fashion-MNIST under ``root``.

    Order: already staged -> copy from ``source_dir`` -> download (if allowed).
    """
    if is_staged(root):
        return _raw_folder(root)
    if Path(source_dir).is_dir():
        return stage_from_directory(source_dir, root)
    if allow_download:
        try:
            return download(root)
        except Exception as exc:  # torchvision raises RuntimeError/URLError mixes
            raise DatasetMissingError(f"Downloading Fashion-MNIST failed ({exc}). {HOW_TO_GET_IT}") from exc
    raise DatasetMissingError(f"Fashion-MNIST not found in {root} nor in {source_dir}. {HOW_TO_GET_IT}")


def load(root: Path) -> FashionMNISTArrays:
    """Read the staged dataset with torchvision (it parses the IDX files)."""
    if not is_staged(root):
        raise DatasetMissingError(f"Fashion-MNIST is not staged under {root}. {HOW_TO_GET_IT}")
    from torchvision.datasets import FashionMNIST

    train = FashionMNIST(os.fspath(root), train=True, download=False)
    test = FashionMNIST(os.fspath(root), train=False, download=False)
    return FashionMNISTArrays(
        train_images=train.data.to(torch.uint8),
        train_labels=train.targets.to(torch.int64),
        test_images=test.data.to(torch.uint8),
        test_labels=test.targets.to(torch.int64),
    )
