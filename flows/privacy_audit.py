"""``privacy_audit`` stage: the curious vendor's adaptive reconstruction attack.

For the defended model (``train``) and the undefended reference (``train --variant
undefended``): train a decoder on ``aux`` passed through that model's client with its
noise, decode a fixed sample of the features the server received from the owners, and
score the reconstructions. Writes ``metrics/privacy.json`` and
``reports/privacy_grid.png`` (owner images over both models' reconstructions).
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
from flows.entry.stage import stage_main
from securemark.privacy import reconstruction_scores, smash, train_decoder
from securemark.split.protocol import bank_positions
from securemark.storage import read_partition
from securemark.weights import load_weights

GRID_COLUMNS = 8


@task(name="audit-variant", cache_policy=NO_CACHE)
def audit_variant(paths: Paths, settings: Settings, variant: str, aux: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    logger = get_run_logger()
    cfg = settings.privacy_audit
    job = split_job(paths, settings, variant)
    model = load_weights(paths.model(variant))
    noise = torch.Generator().manual_seed(cfg.seed + 1)
    decoder = train_decoder(smash(model.client, aux, job.defence.sigma, noise), aux, cfg, progress=lambda it: tqdm(it, desc=f"decoder ({variant})", unit="epoch"))

    bank = load_file(str(paths.bank(variant)))
    owners, positions = bank_positions(job)
    pick = torch.randperm(len(owners), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.sample]
    images = {k: read_partition(paths.partition(f"owner_{k}")).as_float() for k in range(1, job.owners + 1)}
    originals = torch.stack([images[int(owners[i])][int(positions[i])] for i in pick])
    scores, recon = reconstruction_scores(decoder, bank["features"][pick].float(), originals)
    scores["test_accuracy"] = json.loads(paths.train_metrics(variant).read_text())["test_accuracy"]
    logger.info("%s: %s", variant, {k: round(v, 4) for k, v in scores.items()})
    return scores, originals, recon


@flow(name="privacy-audit", validate_parameters=False)
def privacy_audit_flow(paths: Paths, settings: Settings) -> dict:
    cfg = settings.privacy_audit
    aux = read_partition(paths.partition("aux")).as_float()
    results, rows = {}, []
    with tracking.run("privacy-audit", tracking.TRAIN_EXPERIMENT, paths, tags={"stage": "privacy_audit"}):
        mlflow.log_params({f"privacy_audit.{k}": v for k, v in cfg.__dict__.items()})
        for variant in VARIANTS:
            scores, originals, recon = audit_variant(paths, settings, variant, aux)
            results[variant] = scores
            mlflow.log_metrics({f"{variant}.{k}": v for k, v in scores.items()})
            if not rows:
                rows.append(originals[:GRID_COLUMNS])
            rows.append(recon[:GRID_COLUMNS])
        tracking.write_json(results, paths.privacy_metrics)
        grid = paths.privacy_grid
        grid.parent.mkdir(parents=True, exist_ok=True)
        # rows: owner images, defended reconstructions, undefended reconstructions
        save_image(torch.nn.functional.interpolate(torch.cat(rows), scale_factor=3, mode="nearest"), grid, nrow=GRID_COLUMNS, padding=4, pad_value=1.0)
        mlflow.log_artifact(str(grid))
        mlflow.log_dict(results, "privacy.json")
    return results


def main() -> None:
    stage_main(privacy_audit_flow)


if __name__ == "__main__":
    main()
