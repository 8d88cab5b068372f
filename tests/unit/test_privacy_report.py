"""What an owner is shown: its own images' scores, per attacker, beyond its label floor."""

from __future__ import annotations

import torch

from securemark.privacy import FLOOR
from securemark.privacy.report import owner_markdown, owner_scores


def test_each_owner_gets_the_scores_of_its_own_images_and_the_strongest_attacker():
    g = torch.Generator().manual_seed(0)
    originals = torch.rand(12, 1, 28, 28, generator=g)
    owners = torch.tensor([1] * 6 + [2] * 6)
    blurred = originals.mean(0, keepdim=True).expand_as(originals)
    good = originals.clone()
    good[owners == 2] = blurred[owners == 2]  # the attacker rebuilds owner 1's images only
    per_owner = owner_scores({"decoder": good, FLOOR: blurred}, originals, owners)
    assert set(per_owner) == {1, 2} and per_owner[1]["images"] == 6
    assert per_owner[1]["strongest"] == "decoder" and per_owner[1]["leakage"] > 0.5
    assert per_owner[2]["leakage"] == 0.0  # nothing beyond the floor for owner 2
    text = owner_markdown(1, per_owner[1], {"leakage": 0.3, "strongest": "decoder", "mse_lower_bound": 0.01}, picture="reports/p.png")
    assert "owner 1" in text and "decoder" in text and "0.0100" in text and "reports/p.png" in text
    assert "nothing is certified" in owner_markdown(2, per_owner[2], {"leakage": 0.3, "strongest": "decoder", "mse_lower_bound": 0.0})
