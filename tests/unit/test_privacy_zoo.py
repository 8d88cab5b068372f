"""The privacy attacker zoo on a slice of the real Fashion-MNIST: every attacker can
attack (it rebuilds images from an identity-like client far better than the label
floor), does no better than the floor when the client sends only the label, and the
floor reads ``aux`` and the labels only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from securemark import data as fmnist
from securemark.errors import InvalidConfig, InvalidInput, UnknownName
from securemark.privacy import (
    FLOOR,
    AuditConfig,
    VendorView,
    audit,
    create_attacker,
    leakage,
)

AUX, OWNERS = 1200, 200
FAST = {"decoder": {"epochs": 10, "lr": 3e-3}, "strong_decoder": {"epochs": 3, "width": 16, "blocks": 1, "lr": 3e-3}, "inversion": {"steps": 150},
        "fora": {"epochs": 3, "width": 16, "blocks": 1, "substitute_epochs": 1, "lr": 3e-3},
        "prior_inversion": {"steps": 60, "refine": 60, "prior_epochs": 4, "latent": 16}, FLOOR: {}}
TRAINED = ["decoder", "strong_decoder", "inversion", "fora", "prior_inversion"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


@pytest.fixture(scope="module")
def images(raw_dataset):
    arrays = fmnist.load(raw_dataset)
    x = arrays.train_images[: AUX + OWNERS].float().div(255).unsqueeze(1)
    y = arrays.train_labels[: AUX + OWNERS]
    return (x[:AUX], y[:AUX]), (x[AUX:], y[AUX:])  # the vendor's aux, the owners' images


class IdentityLike(nn.Module):
    """A client that keeps the image (pooled to 14 x 14, twice, as two channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 2)
        return torch.cat([pooled, -pooled], 1)


class LabelOnly(nn.Module):
    """A client that sends only a one-hot class map (here: from a lookup the test owns)."""

    def __init__(self, lookup: dict[bytes, int]) -> None:
        super().__init__()
        self.lookup = lookup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = torch.tensor([self.lookup.get(img.detach().numpy().tobytes(), 0) for img in x])
        return F.one_hot(labels, 10).float()[:, :, None, None].expand(-1, -1, 7, 7).contiguous()


class FlatIdentityLike(nn.Module):
    """A client with a flat cut (as a bottleneck has): the image pooled to 7 x 7, flattened."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 4).flatten(1)


def run_zoo(client: nn.Module, images, attackers=FAST) -> dict[str, dict[str, float]]:
    (aux, aux_labels), (owned, labels) = images
    with torch.no_grad():
        received = client(owned)
    view = VendorView(client, 0.0, aux, aux_labels, received=received)
    return audit(view, received, labels, owned, AuditConfig(attackers=attackers, seed=0)).scores


@pytest.fixture(scope="module")
def identity_scores(images):
    return run_zoo(IdentityLike(), images)


@pytest.fixture(scope="module")
def label_only_scores(images):
    (aux, aux_labels), (owned, labels) = images
    lookup = {img.numpy().tobytes(): int(c) for img, c in zip(torch.cat([aux, owned]), torch.cat([aux_labels, labels]))}
    return run_zoo(LabelOnly(lookup), images)


@pytest.mark.slow  # the zoo is trained for two clients: ~1 min each
@pytest.mark.parametrize("name", TRAINED)
def test_every_attacker_rebuilds_images_from_an_identity_like_client(identity_scores, name):
    floor = identity_scores[FLOOR]["ssim"]
    assert identity_scores[name]["ssim"] > floor + 0.15, identity_scores
    assert identity_scores[name]["psnr"] > identity_scores[FLOOR]["psnr"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_no_attacker_beats_the_floor_by_much_when_only_the_label_crosses(identity_scores, label_only_scores, name):
    floor = label_only_scores[FLOOR]["ssim"]
    assert label_only_scores[name]["ssim"] < floor + 0.05, label_only_scores
    assert label_only_scores[name]["ssim"] < identity_scores[name]["ssim"] - 0.15


@pytest.mark.slow
def test_leakage_is_measured_beyond_the_floor(identity_scores, label_only_scores):
    assert leakage(identity_scores)[0] > 0.15
    assert leakage(label_only_scores)[0] < 0.05
    assert leakage({FLOOR: {"ssim": 0.4}, "decoder": {"ssim": 0.3}}) == (0.0, FLOOR)


def test_the_floor_reads_aux_and_labels_only(images):
    (aux, aux_labels), (_, labels) = images
    floor = create_attacker(FLOOR).fit(VendorView(IdentityLike(), 0.0, aux, aux_labels), torch.Generator())
    garbage = torch.randn(len(labels), 2, 14, 14)
    out = floor.reconstruct(garbage, labels)
    assert torch.equal(out, floor.reconstruct(torch.zeros_like(garbage), labels))  # features are ignored
    for c in labels.unique():
        assert torch.allclose(out[labels == c][0], aux[aux_labels == c].mean(0))


def test_audit_config_checks_the_zoo_before_any_training():
    assert FLOOR in AuditConfig(attackers={"decoder": {}}).attackers  # the floor is always added
    with pytest.raises(UnknownName, match="strong_decoder"):
        AuditConfig(attackers={"gan": {}})
    with pytest.raises(InvalidConfig, match="epochs"):
        AuditConfig(attackers={"decoder": {"epochs": 0}})
    with pytest.raises(InvalidConfig, match="unknown option"):
        AuditConfig(attackers={"inversion": {"epochs": 3}})


@pytest.mark.slow  # ~20 s: trains to convergence
def test_decoders_read_a_flat_cut_and_train_to_convergence(images):
    zoo = {"decoder": {"epochs": 60, "lr": 3e-3, "patience": 2},
           "fora": {"epochs": 4, "width": 16, "blocks": 1, "substitute_epochs": 1, "lr": 4e-3}, FLOOR: {}}
    scores = run_zoo(FlatIdentityLike(), images, zoo)
    assert scores["decoder"]["ssim"] > scores[FLOOR]["ssim"] + 0.15, scores
    assert scores["fora"]["ssim"] > scores[FLOOR]["ssim"] + 0.1, scores
    assert 1 <= scores["decoder"]["epochs"] < 60  # stopped when the held-out SSIM stopped improving
    assert scores["fora"]["epochs"] == 4  # no patience: the epochs asked for


def test_fora_needs_the_received_features(images):
    (aux, aux_labels), _ = images
    with pytest.raises(InvalidInput, match="received"):
        create_attacker("fora", epochs=1).fit(VendorView(IdentityLike(), 0.0, aux, aux_labels), torch.Generator())
