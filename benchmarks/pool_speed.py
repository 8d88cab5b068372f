"""What the model's pooling path is worth where no gradient is taken.

``securemark.model.MaxPool2x2`` computes a 2 x 2 max-pool as the maximum of four strided
slices whenever no gradient is needed, and calls ``max_pool2d`` otherwise. This script
times both on the same model and inputs, alternately, and checks that they give the same
outputs bit for bit:

- ``accuracy``: the test-set accuracy of the vendor's base model (10,000 images, batches
  of 1,000: what every stage evaluating a copy or an attacked model runs);
- ``pool``: the layer alone on a ``[1000, 32, 28, 28]`` activation (the first block's).

Needs the outputs of ``dvc repro train``; run from the repository root:

    python benchmarks/pool_speed.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from results_io import report  # noqa: E402  (sibling module: scripts run as python benchmarks/<name>.py)

OUT = Path(__file__).resolve().parent / "results" / "pool_speed.json"


def _seconds(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from flows.adapters.paths import Paths
    from securemark.model import MaxPool2x2, accuracy, units
    from securemark.storage import read_partition
    from securemark.weights import load_weights

    paths = Paths.from_env()
    test = read_partition(paths.partition("test"))
    images, labels = test.as_float(), test.labels
    fast = load_weights(paths.base_model).eval()
    slow = load_weights(paths.base_model).eval()
    for _, block in units(slow):
        if isinstance(getattr(block, "pool", None), MaxPool2x2):
            block.pool = nn.MaxPool2d(2)  # the library's kernel, as before
    with torch.no_grad():
        same_outputs = bool(torch.equal(fast(images[:2000]), slow(images[:2000])))
    activation = torch.relu(torch.randn(1000, 32, 28, 28, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        same_pool = bool(torch.equal(MaxPool2x2()(activation), nn.MaxPool2d(2)(activation)))

    timings = {"accuracy": {}, "pool": {}}
    for _ in range(args.repeats):  # alternate, so a slow spell of the machine hits both
        timings["accuracy"].setdefault("max_pool2d", []).extend(_seconds(lambda: accuracy(slow, images, labels), 1))
        timings["accuracy"].setdefault("slices", []).extend(_seconds(lambda: accuracy(fast, images, labels), 1))
        with torch.no_grad():
            timings["pool"].setdefault("max_pool2d", []).extend(_seconds(lambda: nn.functional.max_pool2d(activation, 2), 1))
            timings["pool"].setdefault("slices", []).extend(_seconds(lambda: MaxPool2x2()(activation), 1))
    result = {
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "same_outputs": same_outputs,
        "same_pool": same_pool,
        **{f"{what}_seconds_median": {k: round(statistics.median(v), 4) for k, v in t.items()} for what, t in timings.items()},
    }
    result["accuracy_speedup"] = round(result["accuracy_seconds_median"]["max_pool2d"] / result["accuracy_seconds_median"]["slices"], 2)
    result["pool_speedup"] = round(result["pool_seconds_median"]["max_pool2d"] / result["pool_seconds_median"]["slices"], 2)
    report(result, OUT)
    return result


if __name__ == "__main__":
    main()
