"""Time the overhead of split training over central training of the same network.

On the same data (the first ``--images-per-owner`` images of ``owner_1..owner_K``), the
same initial weights and the same batches in the same order, times:

- central training of ``SplitNet`` (one model, one Adam, the owners' data concatenated);
- in-process split training (``create_transport("inprocess")``);
- gloo split training (``create_transport("gloo")``, one process per party), both as the
  server's own training time (``result.seconds``) and as wall time with process start.

Split runs undefended (alpha = sigma = 0, the same computation as central) and defended
(``--alpha``, ``--sigma``). Prints one JSON line and writes it to
``benchmarks/results/split_overhead.json``.

    python benchmarks/split_overhead.py --images-per-owner 10000 --owners 3 --epochs 2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.model import ModelSpec, SplitNet
from securemark.privacy.defence import DefenceConfig
from securemark.split.parties import order_generator
from securemark.split.protocol import InMemoryOwners, SplitJob, TrainConfig
from securemark.split.transport import create_transport
from securemark.storage import read_partition

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "split_overhead.json"


def load_owners(partitions: Path, owners: int, per_owner: int) -> InMemoryOwners:
    """The first ``per_owner`` images (float [N, 1, 28, 28]) and labels of each owner."""
    data = []
    for k in range(1, owners + 1):
        part = read_partition(partitions / f"owner_{k}")
        data.append((part.as_float()[:per_owner].contiguous(), part.labels[:per_owner].contiguous()))
    return InMemoryOwners(tuple(data))


def central_batches(job: SplitJob, epoch_orders: list[list[torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
    """One epoch's (owner, row indices) in the order the split server receives them."""
    cursor = [0] * job.owners
    out = []
    for counts in job.schedule():
        for k, count in enumerate(counts):
            out.extend((k, b) for b in epoch_orders[k][cursor[k] : cursor[k] + count])
            cursor[k] += count
    return out


def warm_up(job: SplitJob, steps: int = 5) -> None:
    """A few untimed steps, so that the first timed run does not pay for kernel set-up."""
    x, y = job.load_owner(1)
    model = job.initial_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=job.train.lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(x[: job.train.batch_size]), y[: job.train.batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def train_central(job: SplitJob) -> tuple[SplitNet, float, float]:
    """Plain training of the whole network on the concatenated data, same batches and
    order as split training. Returns (model, seconds, final-epoch train loss)."""
    data = [job.load_owner(k) for k in range(1, job.owners + 1)]
    offsets = torch.tensor([0, *job.owner_sizes]).cumsum(0)
    images = torch.cat([x for x, _ in data])
    labels = torch.cat([y for _, y in data])
    generators = [order_generator(job.train.seed, k) for k in range(1, job.owners + 1)]
    start = time.perf_counter()
    model = job.initial_model()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=job.train.lr)
    for _ in range(job.train.epochs):
        orders = [list(torch.randperm(n, generator=g).split(job.train.batch_size)) for n, g in zip(job.owner_sizes, generators)]
        loss_sum, seen = 0.0, 0
        for k, batch in central_batches(job, orders):
            rows = batch + offsets[k]
            loss = F.cross_entropy(model(images[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(rows)
            seen += len(rows)
    return model, time.perf_counter() - start, loss_sum / max(seen, 1)


def time_split(job: SplitJob, transport: str, **cfg) -> dict:
    start = time.perf_counter()
    result = create_transport(transport, **cfg).train(job, progress=False)
    wall = time.perf_counter() - start
    return {"seconds": result.seconds, "wall_seconds": wall, "train_loss": result.history[-1]["train_loss"]}


def run(job: SplitJob, defence: DefenceConfig, gloo_threads: int | None) -> dict:
    """Time central, in-process and gloo training (undefended and defended)."""
    warm_up(job)
    _, central_seconds, central_loss = train_central(job)
    defended = replace(job, defence=defence)
    gloo_cfg = {"threads_per_process": gloo_threads}
    runs = {
        "inprocess": time_split(job, "inprocess"),
        "inprocess_defended": time_split(defended, "inprocess"),
        "gloo": time_split(job, "gloo", **gloo_cfg),
        "gloo_defended": time_split(defended, "gloo", **gloo_cfg),
    }
    out: dict = {"central_seconds": round(central_seconds, 3), "central_train_loss": round(central_loss, 4)}
    for name, r in runs.items():
        out[f"{name}_seconds"] = round(r["seconds"], 3)
        if name.startswith("gloo"):
            out[f"{name}_wall_seconds"] = round(r["wall_seconds"], 3)
        out[f"{name}_train_loss"] = round(r["train_loss"], 4)
    for name, r in runs.items():
        out[f"ratio_{name}"] = round(r["seconds"] / central_seconds, 3)
    out["ratio_gloo_wall"] = round(runs["gloo"]["wall_seconds"] / central_seconds, 3)
    out["ratio_gloo_defended_wall"] = round(runs["gloo_defended"]["wall_seconds"] / central_seconds, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-owner", type=int, default=10_000)
    parser.add_argument("--owners", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--local-steps", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gloo-threads", type=int, default=None, help="torch threads per gloo process (default: torch's)")
    parser.add_argument("--partitions", type=Path, default=Path("data/partitions"))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    partitions = args.partitions
    if not partitions.is_absolute() and not partitions.exists():
        partitions = REPO / partitions
    owners = load_owners(partitions, args.owners, args.images_per_owner)
    cfg = TrainConfig(args.epochs, args.batch_size, args.lr, args.local_steps, args.seed)
    job = SplitJob(ModelSpec(), cfg, DefenceConfig(), tuple(len(y) for _, y in owners.data), owners)

    result = {
        "owners": job.owners,
        "images_per_owner": list(job.owner_sizes),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "local_steps": cfg.local_steps,
        "alpha": args.alpha,
        "sigma": args.sigma,
        "torch_threads": torch.get_num_threads(),
        "gloo_threads": args.gloo_threads,
        **run(job, DefenceConfig(args.alpha, args.sigma), args.gloo_threads),
    }
    report(result, args.output)


if __name__ == "__main__":
    main()
