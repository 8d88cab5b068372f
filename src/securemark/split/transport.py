"""How split-training messages travel: a registry of transports.

- ``inprocess``: owners and server are objects in one process; a message is a call.
- ``gloo``: one process per owner plus one server process, talking point-to-point with
  ``torch.distributed`` (gloo backend). Rank 0 is the vendor's server, ranks 1..K the
  owners. Launch locally with :meth:`GlooTransport.train` (spawns the processes) or on
  several machines with ``torchrun`` and the usual MASTER_ADDR / MASTER_PORT / RANK /
  WORLD_SIZE variables (see ``flows/split_worker.py``).

Both run the same protocol (:mod:`securemark.split.protocol`); for the same seed and
data order they produce the same weights.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from securemark.errors import InvalidConfig
from securemark.model import SplitNet
from securemark.registry import Registry
from securemark.split.messages import GradientReply, MessageRejected, SmashedBatch
from securemark.split.parties import DataOwner, SplitServer
from securemark.split.protocol import (
    SplitJob,
    TrainResult,
    bank_batches,
    begin_epoch,
    end_training,
    load_average,
    make_owner,
    make_server,
    owner_round,
    round_batches,
    run_owner,
    send_bank,
)

log = logging.getLogger(__name__)
_TRANSPORTS: Registry[type] = Registry("transport")
register_transport = _TRANSPORTS.register
transport_names = _TRANSPORTS.names


def create_transport(name: str, **cfg):
    return _TRANSPORTS.get(name)(**cfg)


# --------------------------------------------------------------------- in-process
class _DirectChannel:
    def __init__(self, server: SplitServer) -> None:
        self.server = server

    def exchange(self, msg: SmashedBatch) -> GradientReply:
        return self.server.handle(msg)

    def send(self, msg: SmashedBatch) -> None:
        self.server.record(msg)


def _average_in_process(owners: list[DataOwner]) -> None:
    load_average(owners, [o.client.state_dict() for o in owners])


@register_transport("inprocess")
class InProcessTransport:
    """All parties in this process; the default for ``dvc repro``."""

    def train(self, job: SplitJob, progress: bool = True, on_epoch: Callable[[int, SplitNet, dict], None] | None = None) -> TrainResult:
        start = time.perf_counter()
        server = make_server(job)
        owners = [make_owner(job, k) for k in range(1, job.owners + 1)]
        channel = _DirectChannel(server)
        history = []
        for epoch in tqdm(range(job.train.epochs), desc="split training", unit="epoch", disable=not progress):
            begin_epoch(server, epoch, job)
            per_owner = [round_batches(o, job) for o in owners]
            for r in range(len(per_owner[0])):
                for owner, rounds in zip(owners, per_owner):  # owners take turns
                    owner_round(owner, channel, rounds[r])
                _average_in_process(owners)
            stats = {"epoch": epoch + 1, **server.stats(), "dcor_penalty": _mean_dcor(owners)}
            history.append(stats)
            if on_epoch is not None:
                on_epoch(epoch + 1, SplitNet(job.spec, owners[0].client, server.server), stats)
        if job.record_bank:
            for owner in owners:
                send_bank(owner, channel, job)
        model = SplitNet(job.spec, owners[0].client, server.server)
        return TrainResult(model, history, end_training(server), time.perf_counter() - start)


def _mean_dcor(owners: list[DataOwner]) -> float:
    steps = sum(o.steps for o in owners)
    value = sum(o.dcor_sum for o in owners) / max(steps, 1)
    for o in owners:
        o.dcor_sum, o.steps = 0.0, 0
    return value


# --------------------------------------------------------------------- gloo
FLOAT32 = 1
_HEADER = 7  # dtype code, ndim, up to 5 dims


class GlooOwnerChannel:
    """Owner side: send (header, features, labels) to rank 0, receive status, dL/dz, loss."""

    def __init__(self, server_rank: int = 0) -> None:
        self.server_rank = server_rank

    def _deliver(self, msg: SmashedBatch) -> None:
        """Header, status, features, labels, status: the batch is with the server."""
        f = msg.features
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0] = FLOAT32 if f.dtype == torch.float32 else -1
        header[1] = f.ndim
        header[2 : 2 + min(f.ndim, 5)] = torch.tensor(f.shape[:5])
        dist.send(header, self.server_rank)
        status = torch.zeros(1, dtype=torch.int64)
        dist.recv(status, self.server_rank)
        if status.item() != 0:
            raise MessageRejected(f"server rejected owner {msg.owner}'s header {header.tolist()}")
        dist.send(f, self.server_rank)
        dist.send(msg.labels, self.server_rank)
        dist.recv(status, self.server_rank)
        if status.item() != 0:
            raise MessageRejected(f"server rejected owner {msg.owner}'s batch")

    def send(self, msg: SmashedBatch) -> None:
        """A feature-bank batch: delivered, no gradient comes back."""
        self._deliver(msg)

    def exchange(self, msg: SmashedBatch) -> GradientReply:
        f = msg.features
        self._deliver(msg)
        grad = torch.empty_like(f)
        loss = torch.zeros(1, dtype=torch.float64)
        dist.recv(grad, self.server_rank)
        dist.recv(loss, self.server_rank)
        return GradientReply(grad, float(loss))


class GlooServerInbox:
    """Server side. The header is checked against the cut shape before any payload is
    accepted, so the buffer the server receives into can only hold smashed features."""

    def __init__(self, server: SplitServer) -> None:
        self.server = server

    def _receive(self, rank: int) -> SmashedBatch:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        dist.recv(header, rank)
        ndim = int(header[1])
        shape = tuple(int(d) for d in header[2 : 2 + ndim])
        ok = header[0] == FLOAT32 and ndim == 1 + len(self.server.cut_shape) and shape[1:] == self.server.cut_shape and shape[0] > 0
        dist.send(torch.tensor([0 if ok else 1], dtype=torch.int64), rank)
        if not ok:
            raise MessageRejected(f"owner rank {rank} sent a tensor of shape {shape}; only [B, {self.server.cut_shape}] float32 features are accepted")
        features = torch.empty(shape, dtype=torch.float32)
        labels = torch.empty(shape[0], dtype=torch.int64)
        dist.recv(features, rank)
        dist.recv(labels, rank)
        return SmashedBatch(rank, features, labels)

    def serve_one(self, rank: int) -> None:
        """One training step for owner ``rank``: its batch in, dL/dz and the loss back."""
        msg = self._receive(rank)
        try:
            reply = self.server.handle(msg)
        except MessageRejected:
            dist.send(torch.tensor([1], dtype=torch.int64), rank)
            raise
        dist.send(torch.tensor([0], dtype=torch.int64), rank)
        dist.send(reply.grad.contiguous(), rank)
        dist.send(torch.tensor([reply.loss], dtype=torch.float64), rank)

    def record_one(self, rank: int) -> None:
        """One feature-bank batch from owner ``rank``."""
        msg = self._receive(rank)
        try:
            self.server.record(msg)
        except MessageRejected:
            dist.send(torch.tensor([1], dtype=torch.int64), rank)
            raise
        dist.send(torch.tensor([0], dtype=torch.int64), rank)


def _flatten(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every tensor of a state dict in one float32 vector (batch-norm counters included:
    they stay exact far beyond any run's length)."""
    return torch.cat([t.reshape(-1).to(torch.float32) for t in state.values()])


def _unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for key, t in like.items():
        out[key] = flat[start : start + t.numel()].view_as(t).to(t.dtype)
        start += t.numel()
    return out


class GlooClientAverager:
    """Owners all-gather their client weights within the owners' group and average them
    in owner order, with the same function the in-process transport uses."""

    def __init__(self, group) -> None:
        self.group = group
        self.size = dist.get_world_size(group)

    def __call__(self, owners: list[DataOwner]) -> None:
        (owner,) = owners
        state = owner.client.state_dict()
        flat = _flatten(state)
        gathered = [torch.empty_like(flat) for _ in range(self.size)]
        dist.all_gather(gathered, flat, group=self.group)
        load_average(owners, [_unflatten(g, state) for g in gathered])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@register_transport("gloo")
class GlooTransport:
    """torch.distributed point-to-point over gloo: rank 0 server, ranks 1..K owners."""

    def __init__(self, threads_per_process: int | None = None, timeout_s: float = 600.0) -> None:
        self.threads = threads_per_process
        self.timeout_s = timeout_s

    # Local launch: spawn K+1 processes, collect rank 0's result through a file.
    def train(self, job: SplitJob, progress: bool = True, on_epoch=None) -> TrainResult:
        with tempfile.TemporaryDirectory(prefix="securemark-gloo-") as tmp:
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
            mp.start_processes(
                _spawned_rank, args=(job, job.owners + 1, env, tmp, progress, self), nprocs=job.owners + 1, start_method="spawn"
            )
            return _read_result(Path(tmp), job)

    def run_rank(self, job: SplitJob, rank: int, world_size: int, progress: bool = True) -> TrainResult | None:
        """Run this process's role; returns the trained model on rank 0, None elsewhere.

        Expects MASTER_ADDR / MASTER_PORT in the environment (torchrun sets them)."""
        if world_size != job.owners + 1:
            raise InvalidConfig(f"world size {world_size} != owners + 1 = {job.owners + 1}")
        if self.threads:
            torch.set_num_threads(self.threads)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=self.timeout_s))
        try:
            owners_group = dist.new_group(ranks=list(range(1, world_size)))
            if rank == 0:
                return self._serve(job, progress)
            owner = make_owner(job, rank)
            run_owner(owner, GlooOwnerChannel(), GlooClientAverager(owners_group), job)
            if rank == 1:  # hand the averaged client part to the vendor, who assembles the model
                dist.send(_flatten(owner.client.state_dict()).contiguous(), 0)
            return None
        finally:
            dist.destroy_process_group()

    def _serve(self, job: SplitJob, progress: bool) -> TrainResult:
        start = time.perf_counter()
        server = make_server(job)
        inbox = GlooServerInbox(server)
        schedule = job.schedule()
        history = []
        for epoch in tqdm(range(job.train.epochs), desc="split training (gloo)", unit="epoch", disable=not progress):
            begin_epoch(server, epoch, job)
            for counts in schedule:
                for rank, n in enumerate(counts, start=1):  # owners take turns
                    for _ in range(n):
                        inbox.serve_one(rank)
            history.append({"epoch": epoch + 1, **server.stats()})
        if job.record_bank:
            for rank in range(1, job.owners + 1):
                for _ in bank_batches(job, rank):
                    inbox.record_one(rank)
        model = job.initial_model()
        client_state = model.client.state_dict()
        flat = torch.empty_like(_flatten(client_state))
        dist.recv(flat, 1)
        model.client.load_state_dict(_unflatten(flat, client_state))
        model.server = server.server
        return TrainResult(model, history, end_training(server), time.perf_counter() - start)


def _spawned_rank(rank: int, job: SplitJob, world_size: int, env: dict, tmp: str, progress: bool, transport: GlooTransport) -> None:
    os.environ.update(env)
    result = transport.run_rank(job, rank, world_size, progress=progress)
    if result is not None:
        _write_result(Path(tmp), result)


def _write_result(directory: Path, result: TrainResult) -> None:
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(directory / "model.safetensors"))
    if result.bank is not None:
        save_file(result.bank, str(directory / "bank.safetensors"))
    (directory / "meta.json").write_text(json.dumps({"seconds": result.seconds, "history": result.history}))


def _read_result(directory: Path, job: SplitJob) -> TrainResult:
    model = job.initial_model()
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    bank_file = directory / "bank.safetensors"
    meta = json.loads((directory / "meta.json").read_text())
    bank = load_file(str(bank_file)) if bank_file.exists() else None
    return TrainResult(model, meta["history"], bank, meta["seconds"])
