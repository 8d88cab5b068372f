"""The privacy audit's computation, apart from its logging: what a spawned worker process
imports (this module loads neither Prefect nor MLflow, so a worker starts in ~2 s instead of
~6 s). The ``privacy_audit`` stage (:mod:`flows.privacy_audit`) runs :func:`compute_variant`
once per variant and logs what it returns; ``benchmarks/audit_budget.py`` reads the same
owner sample."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from flows.adapters.jobs import split_job
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from securemark.privacy import AuditResult, VendorView, audit
from securemark.privacy.fisher import fisher_bound
from securemark.split.protocol import bank_positions
from securemark.storage import read_partition
from securemark.weights import load_weights


def owner_sample(paths: Paths, settings: Settings, variant: str, bank: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed sample (``privacy_audit.sample`` rows of the feature ``bank``, drawn with
    the base seed): features as received, their labels, the owner images they came from
    and the owner (1-based) of each."""
    cfg = settings.privacy_audit
    job = split_job(paths, settings, variant)
    owners, positions = bank_positions(job)
    pick = torch.randperm(len(owners), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.sample]
    images = {k: read_partition(paths.partition(f"owner_{k}")).as_float() for k in range(1, job.owners + 1)}
    originals = torch.stack([images[int(owners[i])][int(positions[i])] for i in pick]).clone()
    return bank["features"][pick].float(), bank["labels"][pick], originals, owners[pick].clone()


@dataclass(frozen=True)
class VariantAudit:
    """One variant's audit, as computed in a worker process (:func:`compute_variant`)."""

    summary: dict
    result: AuditResult
    originals: torch.Tensor
    owners: torch.Tensor
    attackers: list[tuple[str, dict, dict]]  # (name, options, scores) in the order they were fitted


def compute_variant(paths: Paths, settings: Settings, variant: str, threads: int | None = None) -> VariantAudit:
    """The attacker zoo and the certified bound against one variant, without logging (so it
    can run in a process of its own; ``threads``: torch threads there). A function of the
    settings' seed: the same inputs give the same scores in any process (with the same
    thread count: floating-point sums follow it, which moves an SSIM in its 4th decimal)."""
    if threads is not None:
        torch.set_num_threads(threads)
    job = split_job(paths, settings, variant)
    aux = read_partition(paths.partition("aux"))
    bank = load_file(str(paths.bank(variant)))
    client = load_weights(paths.model(variant)).client
    view = VendorView(client, job.defence.sigma, aux.as_float(), aux.labels, received=bank["features"].float())
    features, labels, originals, owners = owner_sample(paths, settings, variant, bank)
    attackers = []

    def progress(it, name):
        return tqdm(it, desc=f"{name} ({variant})", unit="epoch")

    result = audit(view, features, labels, originals, settings.privacy_audit, progress=progress,
                   on_result=lambda name, attacker, scores: attackers.append((name, attacker.options(), scores)))
    bound = fisher_bound(client, originals, job.defence.sigma)
    summary = {"test_accuracy": json.loads(paths.train_metrics(variant).read_text())["test_accuracy"], **result.summary(),
               **bound.summary(), "cut_shape": list(job.spec.cut_shape)}
    return VariantAudit(summary, result, originals, owners, attackers)
