"""Split training on a slice of real Fashion-MNIST: two owners and the vendor in three
processes over torch.distributed (gloo) train exactly what the in-process transport
trains; raw images cannot cross the boundary; and training learns."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from securemark.model import ModelSpec, SplitNet, accuracy
from securemark.privacy.defence import DefenceConfig
from securemark.split.messages import MessageRejected, SmashedBatch
from securemark.split.protocol import InMemoryOwners, SplitJob, TrainConfig, make_server
from securemark.split.transport import create_transport
from securemark.storage import read_partition

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def owner_data(prepared_project) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(images float [N, 1, 28, 28], labels) of owner_1 and owner_2 (300 images each)."""
    parts = [read_partition(prepared_project.partition(f"owner_{k}")) for k in (1, 2)]
    return tuple((p.as_float(), p.labels) for p in parts)


def make_job(data, per_owner: int, defence: DefenceConfig, **train) -> SplitJob:
    sliced = tuple((x[:per_owner].contiguous(), y[:per_owner].contiguous()) for x, y in data)
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 64, "lr": 1e-3, "local_steps": 2, "seed": 3, **train})
    return SplitJob(ModelSpec(), cfg, defence, tuple(len(y) for _, y in sliced), InMemoryOwners(sliced))


def train_in_process_single_thread(job: SplitJob):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the gloo processes run one thread each: same kernels, same sums
    try:
        return create_transport("inprocess").train(job, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_gloo_processes_train_bit_identically_to_in_process(owner_data):
    job = make_job(owner_data, 256, DefenceConfig(alpha=0.5, sigma=0.1))
    gloo = create_transport("gloo", threads_per_process=1, timeout_s=60).train(job, progress=False)
    local = train_in_process_single_thread(job)

    a, b = gloo.model.state_dict(), local.model.state_dict()
    assert a.keys() == b.keys()
    assert not torch.equal(a["server.fc.weight"], job.initial_model().state_dict()["server.fc.weight"])  # it trained
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert gloo.bank.keys() == local.bank.keys() == {"features", "labels", "owners"}
    for key in gloo.bank:
        assert torch.equal(gloo.bank[key], local.bank[key]), key
    assert len(gloo.bank["labels"]) == 512
    for g, loc in zip(gloo.history, local.history, strict=True):
        assert g["train_loss"] == loc["train_loss"] and g["train_accuracy"] == loc["train_accuracy"]


class PassThrough(nn.Module):
    """A 'client' that forwards the raw image (one scalar parameter, so the owner's
    optimiser and the client averaging still work)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class RawImageJob(SplitJob):
    """A job whose owners skip the privacy partition and would send [B, 1, 28, 28]."""

    def initial_model(self) -> SplitNet:
        model = super().initial_model()
        return SplitNet(self.spec, PassThrough(), model.server)


def test_a_raw_image_cannot_cross_over_gloo(owner_data):
    job = make_job(owner_data, 128, DefenceConfig(), epochs=1)
    raw = RawImageJob(job.spec, job.train, job.defence, job.owner_sizes, job.load_owner)
    start = time.perf_counter()
    with pytest.raises(Exception) as info:  # torch.multiprocessing.ProcessRaisedException
        create_transport("gloo", threads_per_process=1, timeout_s=30).train(raw, progress=False)
    assert time.perf_counter() - start < 60
    assert "MessageRejected" in str(info.value)
    assert "1, 28, 28" in str(info.value)  # the header of the raw image batch was refused


def test_in_process_server_rejects_real_images(owner_data):
    job = make_job(owner_data, 64, DefenceConfig())
    server = make_server(job)
    images, labels = owner_data[0][0][:32], owner_data[0][1][:32]
    with pytest.raises(MessageRejected, match="shape"):
        server.handle(SmashedBatch(1, images, labels))
    assert server.seen == 0


def test_in_process_training_lowers_the_loss_on_real_data(owner_data, prepared_project):
    job = make_job(owner_data, 300, DefenceConfig(), epochs=3, batch_size=32, local_steps=5, lr=2e-3)
    x, y = owner_data[0][0][:256], owner_data[0][1][:256]
    initial = job.initial_model().eval()
    with torch.no_grad():
        loss_before = F.cross_entropy(initial(x), y).item()
    result = create_transport("inprocess").train(job, progress=False)
    with torch.no_grad():
        loss_after = F.cross_entropy(result.model.eval()(x), y).item()

    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[2]["train_loss"] < 0.6 * result.history[0]["train_loss"]
    assert loss_after < 0.6 * loss_before
    test = read_partition(prepared_project.partition("test"))
    assert accuracy(result.model, test.as_float(), test.labels) > 0.45  # chance is 0.1
