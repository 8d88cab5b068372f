"""``privacy_audit`` stage: the curious vendor's attacker zoo against both models.

For the defended model (``train``) and the undefended reference (``train --variant
undefended``): every attacker of ``privacy_audit.attackers`` (see
:mod:`securemark.privacy.attackers`) is fitted on what the vendor holds (``aux`` and
its labels, the client it ships, the defence's noise model) and rebuilds a fixed sample
of the owner images from the features the server received. Writes
``metrics/privacy.json`` (per variant: test accuracy, the label-only floor, leakage
beyond it, the strongest attacker and each attacker's SSIM / PSNR / dCor), an MLflow
run per attacker (nested under the stage's run) and ``reports/privacy_grid.png``
(owner images, then one row per variant and attacker).
"""

from __future__ import annotations

import json

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file
from torchvision.utils import save_image
from tqdm.auto import tqdm

from flows.adapters import tracking
from flows.adapters.jobs import split_job
from flows.adapters.paths import VARIANTS, Paths
from flows.adapters.settings import Settings
from flows.adapters.stage import stage_main
from securemark.privacy import AuditResult, VendorView, audit
from securemark.split.protocol import bank_positions
from securemark.storage import read_partition
from securemark.weights import load_weights

GRID_COLUMNS = 8


def owner_sample(paths: Paths, settings: Settings, variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed sample (``privacy_audit.sample`` rows of the feature bank, drawn with the
    base seed): features as received, their labels, and the owner images they came from."""
    cfg = settings.privacy_audit
    job = split_job(paths, settings, variant)
    bank = load_file(str(paths.bank(variant)))
    owners, positions = bank_positions(job)
    pick = torch.randperm(len(owners), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.sample]
    images = {k: read_partition(paths.partition(f"owner_{k}")).as_float() for k in range(1, job.owners + 1)}
    originals = torch.stack([images[int(owners[i])][int(positions[i])] for i in pick]).clone()
    return bank["features"][pick].float(), bank["labels"][pick], originals


@task(name="audit-variant", cache_policy=NO_CACHE)
def audit_variant(paths: Paths, settings: Settings, variant: str, parent: mlflow.ActiveRun) -> tuple[dict, AuditResult, torch.Tensor]:
    logger = get_run_logger()
    job = split_job(paths, settings, variant)
    aux = read_partition(paths.partition("aux"))
    view = VendorView(load_weights(paths.model(variant)).client, job.defence.sigma, aux.as_float(), aux.labels)
    features, labels, originals = owner_sample(paths, settings, variant)

    def log_attacker(name, attacker, scores) -> None:
        logger.info("%s / %s: %s", variant, name, {k: round(v, 4) for k, v in scores.items()})
        tags = {"stage": "privacy_audit", "variant": variant, "attacker": name}
        params = {f"attacker.{k}": v for k, v in attacker.options().items()} | {"attacker": name, "variant": variant}
        tracking.child_run(parent, f"privacy-{variant}-{name}", tags, params, scores)

    def progress(it, name):
        return tqdm(it, desc=f"{name} ({variant})", unit="epoch")

    result = audit(view, features, labels, originals, settings.privacy_audit, progress=progress, on_result=log_attacker)
    summary = {"test_accuracy": json.loads(paths.train_metrics(variant).read_text())["test_accuracy"], **result.summary()}
    logger.info("%s: leakage beyond labels %.4f (strongest: %s; label floor SSIM %.4f)", variant, result.leakage, result.strongest, result.floor_ssim)
    return summary, result, originals


@flow(name="privacy-audit", validate_parameters=False)
def privacy_audit_flow(paths: Paths, settings: Settings) -> dict:
    cfg = settings.privacy_audit
    results: dict = {}
    rows: list[torch.Tensor] = []
    with tracking.run("privacy-audit", tracking.TRAIN_EXPERIMENT, paths, tags={"stage": "privacy_audit"}) as parent:
        mlflow.log_params({"privacy_audit.sample": cfg.sample, "privacy_audit.attackers": ",".join(cfg.attackers)})
        for variant in VARIANTS:
            summary, result, originals = audit_variant(paths, settings, variant, parent)
            results[variant] = summary
            mlflow.log_metrics({f"{variant}.{k}": v for k, v in summary.items() if isinstance(v, float)})
            if not rows:
                rows.append(originals[:GRID_COLUMNS])
            rows += [recon[:GRID_COLUMNS] for recon in result.reconstructions.values()]
        results["accuracy_gap_pt"] = 100 * (results["undefended"]["test_accuracy"] - results["defended"]["test_accuracy"])
        tracking.write_json(results, paths.privacy_metrics)
        grid = paths.privacy_grid
        grid.parent.mkdir(parents=True, exist_ok=True)
        # rows: owner images, then each attacker on the defended model, then each on the undefended one
        save_image(torch.nn.functional.interpolate(torch.cat(rows), scale_factor=3, mode="nearest"), grid, nrow=GRID_COLUMNS, padding=4, pad_value=1.0)
        mlflow.log_artifact(str(grid))
        mlflow.log_dict(results, "privacy.json")
    return results


def main() -> None:
    stage_main(privacy_audit_flow)


if __name__ == "__main__":
    main()
