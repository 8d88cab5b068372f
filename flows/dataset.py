"""Stage Fashion-MNIST under ``data/raw`` for torchvision (``make data``).

Uses the Debian package's files when present, otherwise torchvision's download.
"""

from __future__ import annotations

from flows.entry import stage_main
from flows.project import Paths
from securemark import data as fmnist


def _run(paths: Paths, params: dict) -> None:
    source = params.get("data", {}).get("source_dir", str(fmnist.DEBIAN_DATASET_DIR))
    raw = fmnist.ensure_staged(paths.raw, source_dir=source, allow_download=True)
    print(f"Fashion-MNIST ready in {raw}")


def main() -> None:
    stage_main(_run)


if __name__ == "__main__":
    main()
