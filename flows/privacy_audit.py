"""``privacy_audit`` stage: the curious vendor's attacker zoo against both models.

For the defended model (``train``) and the undefended reference (``train --variant
undefended``): every attacker of ``privacy_audit.attackers`` (see
:mod:`securemark.privacy.attackers`) is fitted on what the vendor holds (``aux`` and
its labels, the client it ships, the defence's noise model and every feature it
received) and rebuilds a fixed sample of the owner images from the features the server
received. The stage runs the budgeted zoo of params (it says so: ``zoo: budgeted``);
``benchmarks/privacy_tradeoff.py`` runs the zoo trained to convergence, which the
defence's claim is made against. The two variants are audited side by side, each in a
spawned process with half the cores (``ops.max_workers`` 1: one after the other, here).

Writes ``metrics/privacy.json`` (per variant: test accuracy, the label-only floor,
leakage beyond it, the strongest attacker, each attacker's SSIM / PSNR / dCor (and
epochs when trained to convergence) and the certified bound of :mod:`securemark.privacy.fisher`),
an MLflow run per attacker (nested under the stage's run), ``reports/privacy_grid.png``
(owner images, then one labelled row per variant and attacker with its SSIM) and, for
every owner, a privacy report: its images beside the strongest reconstruction
(``reports/privacy_owner_<k>.png``), its own scores and the bound, as a Prefect markdown
artifact (``privacy-owner-<k>``) and an MLflow run (``privacy-owner-<k>``).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.adapters import tracking
from flows.adapters.artifacts import publish_markdown
from flows.adapters.paths import VARIANTS, Paths
from flows.adapters.privacy import VariantAudit, compute_variant
from flows.adapters.settings import Settings
from flows.adapters.stage import stage_main
from securemark.privacy import AuditResult
from securemark.privacy.report import owner_markdown, owner_scores

GRID_COLUMNS = 8


def image_rows(rows: list[tuple[str, torch.Tensor]], path: Path) -> Path:
    """A PNG of image rows, each labelled on its left (``rows``: label, images [n, 1, 28, 28])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.1 * columns + 2.6, 1.15 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@task(name="audit-variant", cache_policy=NO_CACHE)
def audit_variant(paths: Paths, settings: Settings, variant: str, parent: mlflow.ActiveRun, threads: int | None) -> VariantAudit:
    """One variant's audit, logged: in a spawned process of its own with ``threads`` torch
    threads (the variants run side by side: two one-thread fits are faster on two cores than
    one two-thread fit after the other), or here when ``threads`` is None."""
    logger = get_run_logger()
    if threads is None:
        done = compute_variant(paths, settings, variant)
    else:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = pool.submit(compute_variant, paths, settings, variant, threads).result()
    for name, options, scores in done.attackers:
        logger.info("%s / %s: %s", variant, name, {k: round(v, 4) for k, v in scores.items()})
        tags = {"stage": "privacy_audit", "variant": variant, "attacker": name}
        params = {f"attacker.{k}": v for k, v in options.items()} | {"attacker": name, "variant": variant}
        tracking.child_run(parent, f"privacy-{variant}-{name}", tags, params, scores)
    summary = done.summary
    logger.info("%s: leakage beyond labels %.4f (strongest: %s; label floor SSIM %.4f); certified MSE >= %.4f", variant, summary["leakage"],
                summary["strongest"], summary["label_floor_ssim"], summary["mse_lower_bound"])
    return done


def owner_reports(paths: Paths, parent: mlflow.ActiveRun, summary: dict, result: AuditResult, originals: torch.Tensor,
                  owners: torch.Tensor) -> dict[int, dict]:
    """Each owner's privacy report on the defended model: picture, markdown, MLflow run."""
    per_owner = owner_scores(result.reconstructions, originals, owners)
    for owner, scores in per_owner.items():
        rows = owners == owner
        strongest = scores["strongest"]
        picture = image_rows([(f"owner {owner}'s images", originals[rows][:GRID_COLUMNS]),
                              (f"{strongest}\nSSIM {scores['attackers'][strongest]['ssim']:.2f}", result.reconstructions[strongest][rows][:GRID_COLUMNS])],
                             paths.reports / f"privacy_owner_{owner}.png")
        text = owner_markdown(owner, scores, summary, picture=str(picture.relative_to(paths.root)))
        publish_markdown(f"privacy-owner-{owner}", text, f"What the vendor's attackers rebuilt of owner {owner}'s images")
        metrics = {"leakage": scores["leakage"], "label_floor_ssim": scores["label_floor_ssim"],
                   **{f"{name}.ssim": s["ssim"] for name, s in scores["attackers"].items()}}
        if summary.get("mse_lower_bound") is not None:
            metrics["mse_lower_bound"] = summary["mse_lower_bound"]
        run_id = tracking.child_run(parent, f"privacy-owner-{owner}", {"stage": "privacy_audit", "owner": str(owner)},
                                    {"owner": owner, "images": scores["images"], "strongest": strongest}, metrics)
        client = mlflow.MlflowClient()
        client.log_artifact(run_id, str(picture))
        client.log_text(run_id, text, f"privacy_owner_{owner}.md")
    return {owner: {k: v for k, v in s.items() if k != "attackers"} | {"ssim": {n: a["ssim"] for n, a in s["attackers"].items()}}
            for owner, s in per_owner.items()}


@flow(name="privacy-audit", validate_parameters=False)
def privacy_audit_flow(paths: Paths, settings: Settings) -> dict:
    cfg = settings.privacy_audit
    results: dict = {"zoo": "budgeted"}  # the converged zoo runs in benchmarks/privacy_tradeoff.py
    rows: list[tuple[str, torch.Tensor]] = []
    with tracking.run("privacy-audit", tracking.TRAIN_EXPERIMENT, paths, tags={"stage": "privacy_audit"}) as parent:
        mlflow.log_params({"privacy_audit.sample": cfg.sample, "privacy_audit.attackers": ",".join(cfg.attackers)})
        side_by_side = min(len(VARIANTS), settings.ops.max_workers)  # ops.max_workers 1: one variant after the other, in this process
        threads = max(1, (os.cpu_count() or 1) // side_by_side) if side_by_side > 1 else None
        if threads is None:  # in this process: one after the other (the attackers' random state is the process's)
            audits = {variant: audit_variant(paths, settings, variant, parent, None) for variant in VARIANTS}
        else:
            futures = {variant: audit_variant.submit(paths, settings, variant, parent, threads) for variant in VARIANTS}
            audits = {variant: future.result() for variant, future in futures.items()}
        for variant in VARIANTS:
            done = audits[variant]
            summary, result, originals, owners = done.summary, done.result, done.originals, done.owners
            results[variant] = summary
            mlflow.log_metrics({f"{variant}.{k}": v for k, v in summary.items() if isinstance(v, float)})
            if not rows:
                rows.append(("owner images", originals[:GRID_COLUMNS]))
            rows += [(f"{variant}: {name}\nSSIM {result.scores[name]['ssim']:.2f}", recon[:GRID_COLUMNS])
                     for name, recon in result.reconstructions.items()]
            if variant == "defended":
                results["owners"] = owner_reports(paths, parent, summary, result, originals, owners)
        results["accuracy_gap_pt"] = 100 * (results["undefended"]["test_accuracy"] - results["defended"]["test_accuracy"])
        tracking.write_json(results, paths.privacy_metrics)
        grid = image_rows(rows, paths.privacy_grid)
        mlflow.log_artifact(str(grid))
        mlflow.log_dict(results, "privacy.json")
    return results


def main() -> None:
    stage_main(privacy_audit_flow)


if __name__ == "__main__":
    main()
