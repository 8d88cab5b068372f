"""The split-training protocol, written once for every transport.

An epoch is a sequence of rounds. In each round the owners take turns: owner 1 runs
``local_steps`` batches through the vendor, then owner 2, and so on; after the round
the owners' client weights are averaged (SplitFed). The schedule (how many batches each
owner sends in each round) follows from public facts only: partition sizes, batch size
and ``local_steps``, so every party computes it on its own.

The protocol talks to the vendor through a :class:`Channel` and averages clients through
a :class:`ClientAverager`; it does not know whether those are function calls or
``torch.distributed`` messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from securemark.errors import ConfigError
from securemark.model import ModelSpec, SplitNet, build_model
from securemark.privacy.defence import DefenceConfig
from securemark.split.messages import GradientReply, SmashedBatch
from securemark.split.parties import DataOwner, SplitServer
from securemark.training import Recipe


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """The vendor's recipe (every party follows it), plus how often the owners average
    their client parts and the seed every party's randomness derives from."""

    local_steps: int = 25  # batches per owner per round, between two client averages
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.local_steps, bool) or not isinstance(self.local_steps, int) or self.local_steps < 1:
            raise ConfigError("train.local_steps", f"must be an integer >= 1, got {self.local_steps!r}")


OwnerLoader = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class InMemoryOwners:
    """An owner loader over tensors already in memory (tests, benchmarks):
    ``data[k - 1] = (images, labels)``. Picklable, so spawned processes can use it."""

    data: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def __call__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[k - 1]


@dataclass(frozen=True)
class SplitJob:
    """Everything a party needs to take part. ``load_owner(k)`` returns owner k's
    (images float [N, 1, 28, 28], labels) and is only ever called by owner k."""

    spec: ModelSpec
    train: TrainConfig
    defence: DefenceConfig
    owner_sizes: tuple[int, ...]
    load_owner: OwnerLoader
    record_bank: bool = True

    @property
    def owners(self) -> int:
        return len(self.owner_sizes)

    def initial_model(self) -> SplitNet:
        """Every party starts from the same initial weights (a function of the seed)."""
        return build_model(self.spec, self.train.seed)

    def batches_per_epoch(self) -> list[int]:
        """Batches each owner sends per epoch."""
        return [math.ceil(n / self.train.batch_size) for n in self.owner_sizes]

    def schedule(self) -> list[list[int]]:
        """``schedule()[r][k]``: batches owner k+1 sends in round r of an epoch."""
        per_owner = self.batches_per_epoch()
        rounds = math.ceil(max(per_owner) / self.train.local_steps)
        steps = self.train.local_steps
        return [[max(0, min(steps, b - r * steps)) for b in per_owner] for r in range(rounds)]


@dataclass
class TrainResult:
    model: SplitNet
    history: list[dict[str, float]] = field(default_factory=list)
    bank: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0


class Channel(Protocol):
    def exchange(self, msg: SmashedBatch) -> GradientReply: ...


class BankChannel(Protocol):
    def send(self, msg: SmashedBatch) -> None: ...


class ClientAverager(Protocol):
    def __call__(self, owners: list[DataOwner]) -> None: ...


def make_owner(job: SplitJob, k: int) -> DataOwner:
    images, labels = job.load_owner(k)
    steps = job.batches_per_epoch()[k - 1] * job.train.epochs
    client = job.initial_model().client.to(memory_format=torch.channels_last)  # faster convolutions on CPUs
    return DataOwner(k, client, images, labels, job.train, steps, job.defence, job.train.seed)


def make_server(job: SplitJob) -> SplitServer:
    server = job.initial_model().server.to(memory_format=torch.channels_last)
    return SplitServer(server, job.spec.cut_shape, job.train, sum(job.batches_per_epoch()) * job.train.epochs,
                       dropout_seed=job.train.seed * 7877 + 13)


def owner_round(owner: DataOwner, channel: Channel, batches: list[torch.Tensor]) -> None:
    """One owner's turn: forward, send features, receive dL/dz, back-propagate."""
    for batch in batches:
        owner.backward(channel.exchange(owner.forward(batch)))


def round_batches(owner: DataOwner, job: SplitJob) -> list[list[torch.Tensor]]:
    """Draw the owner's epoch order and cut it into rounds as the schedule says."""
    batches = owner.epoch_batches(job.train.batch_size)
    sizes = [r[owner.index - 1] for r in job.schedule()]
    out, start = [], 0
    for n in sizes:
        out.append(batches[start : start + n])
        start += n
    return out


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the owners' client state dicts (in owner order): weights and
    batch-norm statistics; integer counters (batches seen) are taken from owner 1."""
    return {key: torch.stack([s[key] for s in states]).mean(0) if states[0][key].is_floating_point() else states[0][key].clone()
            for key in states[0]}


def load_average(owners: list[DataOwner], states: list[dict[str, torch.Tensor]]) -> None:
    mean = average_states(states)
    with torch.no_grad():
        for owner in owners:
            for name, tensor in owner.client.state_dict().items():
                tensor.copy_(mean[name])


def run_owner(owner: DataOwner, channel: Channel, average: ClientAverager, job: SplitJob) -> None:
    """An owner's whole training, as run in its own process, then its part of the
    feature bank (when the job records one)."""
    for _ in range(job.train.epochs):
        for batches in round_batches(owner, job):
            owner_round(owner, channel, batches)
            average([owner])
    if job.record_bank:
        send_bank(owner, channel, job)


def bank_batches(job: SplitJob, k: int) -> list[torch.Tensor]:
    """The batches (row indices, in order) owner k sends for the feature bank."""
    return list(torch.arange(job.owner_sizes[k - 1]).split(job.train.batch_size))


def send_bank(owner: DataOwner, channel: BankChannel, job: SplitJob) -> None:
    """After training: the owner's final, defended features of every image it holds, in order."""
    for batch in bank_batches(job, owner.index):
        channel.send(owner.bank_features(batch))


def begin_epoch(server: SplitServer, epoch: int, job: SplitJob) -> None:
    """Reset per-epoch statistics."""
    server.reset_stats()


def end_training(server: SplitServer) -> dict[str, torch.Tensor] | None:
    bank = server.bank.tensors() if server.bank is not None else None
    server.bank = None
    return bank


def bank_positions(job: SplitJob) -> tuple[torch.Tensor, torch.Tensor]:
    """For each feature-bank row, the sending owner and the row of that owner's partition
    it came from (owners send their images in order, owner 1 first). Lets an audit
    compare reconstructions with the original images."""
    owners = torch.cat([torch.full((n,), k, dtype=torch.int64) for k, n in enumerate(job.owner_sizes, start=1)])
    positions = torch.cat([torch.arange(n) for n in job.owner_sizes])
    return owners, positions
