"""What benchmarks that attack the pipeline's copies start from: the project's settings,
the vendor (its state from ``SECUREMARK_SECRET_FILE`` / ``SECUREMARK_VENDOR_DIR``), its
extractor, the issued copies and the attacker's and test images. Run the pipeline up to
``trace`` first (``dvc repro issue trace``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.adapters.partitions import attacker_data, test_set  # noqa: E402
from flows.adapters.paths import Paths  # noqa: E402
from flows.adapters.settings import Settings  # noqa: E402
from flows.adapters.vendor import open_vendor  # noqa: E402
from flows.attack import load_copies  # noqa: E402
from securemark.attacks.base import AttackData  # noqa: E402
from securemark.model import SplitNet  # noqa: E402
from securemark.tracing import Extractor  # noqa: E402
from securemark.vendor import Vendor  # noqa: E402


@dataclass
class PipelineState:
    paths: Paths
    settings: Settings
    vendor: Vendor
    extractor: Extractor
    issued: dict[str, int]            # customer id -> code-word index
    copies: dict[str, SplitNet]       # customer id -> its delivered copy
    data: AttackData                  # the attacker's own images (its budget)
    test: tuple[torch.Tensor, torch.Tensor]


def load_pipeline_state(threads: int = 2) -> PipelineState:
    torch.set_num_threads(threads)
    paths = Paths.from_env()
    settings = Settings.load(paths.params)
    vendor = open_vendor(paths, settings)
    issued = vendor.issued_codewords()
    return PipelineState(paths, settings, vendor, vendor.extractor(), issued,
                         load_copies(paths, sorted(issued), "files"), attacker_data(paths, settings), test_set(paths))
