"""Stage Fashion-MNIST under ``data/raw`` for torchvision (the set-up step of ``make``).

    python scripts/stage_dataset.py

Uses the files of Debian's ``dataset-fashion-mnist`` package (``data.source_dir``) when
present, otherwise torchvision's download.
"""

from __future__ import annotations

import logging

from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.stage import stage_main
from securemark import data as fmnist

log = logging.getLogger("securemark.setup")


def _run(paths: Paths, settings: Settings) -> None:
    raw = fmnist.ensure_staged(paths.raw, source_dir=settings.data.source_dir, allow_download=True)
    log.info("Fashion-MNIST ready in %s", raw)


if __name__ == "__main__":
    stage_main(_run)
