"""Leakage audit: how well can a curious vendor rebuild owners' images from what it saw?

- :mod:`~securemark.privacy.attackers`: the zoo of reconstruction attackers (a registry)
  and :class:`VendorView`, what they may use.
- :mod:`~securemark.privacy.scores`: SSIM / PSNR / dCor of reconstructions and the
  headline number, *leakage beyond the labels*.

:func:`audit` runs a zoo against one model's received features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from securemark import checks
from securemark.errors import InvalidConfig
from securemark.training import scoped_rng
from securemark.privacy.attackers import (
    ATTACKERS,
    PrivacyAttacker,
    Progress,
    VendorView,
    create_attacker,
)
from securemark.privacy.scores import (
    FLOOR,
    feature_dcor,
    leakage,
    reconstruction_scores,
    smash,
)

__all__ = ["ATTACKERS", "FLOOR", "AuditConfig", "AuditResult", "VendorView", "audit", "create_attacker", "leakage", "smash"]

DEFAULT_ATTACKERS: dict[str, dict[str, Any]] = {"decoder": {}, "strong_decoder": {}, "inversion": {}, FLOOR: {}}


@dataclass(frozen=True)
class AuditConfig:
    """``attackers``: name -> options of every attacker in the zoo (the label floor is
    always among them); ``sample``: owner images scored; ``seed``: the sample and every
    attacker's randomness."""

    attackers: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_ATTACKERS))
    sample: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        checks.integer("privacy_audit", "sample", self.sample, 1)
        if not isinstance(self.attackers, dict) or not self.attackers:
            raise InvalidConfig(f"privacy_audit.attackers must map attacker names to options, got {self.attackers!r}")
        attackers = {name: dict(options or {}) for name, options in self.attackers.items()}
        attackers.setdefault(FLOOR, {})  # leakage is measured beyond it
        for name, options in attackers.items():
            create_attacker(name, **options)  # refuses unknown names and bad options now, not after training
        object.__setattr__(self, "attackers", attackers)


@dataclass(frozen=True, eq=False)
class AuditResult:
    """Per attacker: ``scores`` (ssim, psnr, dcor, seconds) and ``reconstructions``."""

    scores: dict[str, dict[str, float]]
    reconstructions: dict[str, torch.Tensor]
    feature_dcor: float

    @property
    def floor_ssim(self) -> float:
        return self.scores[FLOOR]["ssim"]

    @property
    def leakage(self) -> float:
        return leakage(self.scores)[0]

    @property
    def strongest(self) -> str:
        return leakage(self.scores)[1]

    def summary(self) -> dict[str, Any]:
        return {"label_floor_ssim": self.floor_ssim, "leakage": self.leakage, "strongest": self.strongest,
                "feature_dcor": self.feature_dcor, "attackers": self.scores}


def audit(view: VendorView, features: torch.Tensor, labels: torch.Tensor, originals: torch.Tensor, cfg: AuditConfig,
          progress: Progress | None = None, on_result=None) -> AuditResult:
    """Fit every attacker of ``cfg`` on ``view`` and score its reconstructions of the
    received ``features`` (with their ``labels``) against the owners' ``originals``.
    A function of ``cfg.seed``: the same inputs give the same scores in any process.
    ``on_result(name, attacker, scores)`` is called after each attacker (for logging)."""
    scores, recons = {}, {}
    for name, options in cfg.attackers.items():
        start = time.perf_counter()
        attacker: PrivacyAttacker = create_attacker(name, **options)
        generator = torch.Generator().manual_seed(cfg.seed)
        with scoped_rng(generator):  # weight init and dropout draw from torch's global RNG: run it on the audit's seed
            attacker.fit(view, generator, progress)
            recon = attacker.reconstruct(features, labels)
        scores[name] = {**reconstruction_scores(recon, originals), "seconds": round(time.perf_counter() - start, 1)}
        if getattr(attacker, "epochs_run", 0):
            scores[name]["epochs"] = attacker.epochs_run
        recons[name] = recon
        if on_result is not None:
            on_result(name, attacker, scores[name])
    return AuditResult(scores, recons, feature_dcor(originals, features))
