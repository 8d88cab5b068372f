"""One party of gloo split training, for ``torchrun`` (one machine or several).

    torchrun --standalone --nproc-per-node=<K+1> -m flows.split_worker [--variant defended]
    torchrun --nnodes=N --node-rank=i --nproc-per-node=P --master-addr=HOST --master-port=29500 -m flows.split_worker

Rank 0 is the vendor's server, ranks 1..K the data owners; each owner reads only its
own partition (``data/partitions/owner_<rank>``), which must exist on its machine.
torchrun sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE. Rank 0 writes the trained
weights and the feature bank where the ``train`` stage would, and prints the test
accuracy; register the model with ``python -m flows.train`` (``train.transport: gloo``
runs the same protocol with locally spawned processes and logs to MLflow).
"""

from __future__ import annotations

import argparse
import os

from safetensors.torch import save_file

from flows.adapters.jobs import split_job
from flows.adapters.paths import VARIANTS, Paths
from flows.adapters.settings import Settings
from flows.adapters.stage import stage_main
from securemark.model import accuracy
from securemark.split.transport import GlooTransport
from securemark.storage import read_partition
from securemark.weights import save_weights


def _run(paths: Paths, settings: Settings, variant: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    job = split_job(paths, settings, variant)
    result = GlooTransport().run_rank(job, rank, world, progress=rank == 0)
    if result is None:
        return
    save_weights(result.model, paths.model(variant))
    paths.bank(variant).parent.mkdir(parents=True, exist_ok=True)
    save_file(result.bank, str(paths.bank(variant)))
    test = read_partition(paths.partition("test"))
    print(f"{variant} model trained over gloo in {result.seconds:.1f} s: test accuracy {accuracy(result.model, test.as_float(), test.labels):.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one party of gloo split training (run under torchrun)")
    parser.add_argument("--variant", choices=VARIANTS, default="defended")
    args = parser.parse_args(argv)
    stage_main(lambda paths, settings: _run(paths, settings, args.variant))


if __name__ == "__main__":
    main()
