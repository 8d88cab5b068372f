"""``attack`` stage: what customers may do before leaking, and whether tracing survives.

Runs the grid in ``params.yaml`` (section ``attack``) against the issued copies:
single-copy attacks against ``attack.targets`` copies each, coalition attacks
(``average`` and compositions starting with it) against random coalitions of every
size in ``attack.coalition_sizes``, ``attack.trials`` each. Every attacked model is
evaluated (test accuracy, BER against each involved customer) and traced at the
default epsilon through both channels: its weights, and its label-only answers to
the black-box keys (as a prediction API serving it would give them). Writes ``metrics/attacks.csv`` (one row per attacked model),
``metrics/attacks.json`` (summary and the attacker's trade-off table) and logs one
MLflow run per attack family.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlflow
import numpy as np
import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from flows.adapters import artifacts, tracking
from flows.adapters.model_registry import CUSTOMER_MODEL, load_registered
from flows.adapters.partitions import attacker_data, test_set
from flows.adapters.paths import Paths
from flows.adapters.scaleout import results_in_order, retry_unless_invalid, task_runner
from flows.adapters.settings import Settings, attack_options
from flows.adapters.vendor import open_vendor
from flows.adapters.stage import stage_main
from securemark.attacks import AttackData, create_attack
from securemark.evaluation.grid import draw_coalitions, innocents, is_coalition, traced, tracing_summary, tradeoff, worth_it
from securemark.errors import InvalidConfig
from securemark.model import SplitNet
from securemark.tracing import codebook_indices
from securemark.weights import load_weights

ATTACK_EXPERIMENT = "securemark-attacks"
CSV_COLUMNS = ["attack", "strength", "coalition_size", "trial", "attacker_budget", "accuracy", "copy_accuracy", "attacker_alone_accuracy", "worth_it",
               "ber", "ber_unaligned", "colluders", "caught", "innocents_accused",
               "caught_api", "innocents_accused_api", "queries_api", "key_agreement", "traced_by", "off_data_ratio", "obfuscated"]
WITHIN_POINTS = 2.0  # "within 2 pt of the copy": the attacks tracing must survive when they are worth it


@task(name="attack-family", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_invalid, task_run_name="attack-{config[attack]}")
def run_family(paths: Paths, settings: Settings, config: dict, targets: list[list[str]], copies: dict[str, SplitNet], data: AttackData,
               test: tuple[torch.Tensor, torch.Tensor], copy_accuracy: dict[str, float]) -> list[dict]:
    """One attack family against its targets (copies or coalitions), each attacked model
    evaluated and traced. ``copy_accuracy``: each copy's test accuracy (computed once per
    grid). Opens the vendor's state itself: no secret travels as an argument."""
    attack = create_attack(config["attack"], **attack_options(config))
    vendor = open_vendor(paths, settings)
    name = attack.name if len(data) == settings.attacker.budget else f"{attack.name}@{len(data)}"  # another budget: its own row name
    rows = []
    for trial, coalition in enumerate(targets):
        generator = torch.Generator().manual_seed(settings.base.seed + trial)
        attacked = attack([copies[c] for c in coalition], data, generator)
        rows.append({"attack": name, "strength": float(attack.strength), "coalition_size": len(coalition), "trial": trial,
                     "attacker_budget": len(data),
                     "copy_accuracy": float(np.mean([copy_accuracy[c] for c in coalition])),
                     **vendor.evaluate_attacked(attacked, coalition, test)})
    return rows


def attacker_alone_accuracy(paths: Paths, budget: int) -> float:
    """The attacker-alone accuracy at ``budget`` images, from the attacker_baseline stage."""
    try:
        rows = json.loads(paths.attacker_baseline.read_text())
    except FileNotFoundError:
        raise InvalidConfig(f"{paths.attacker_baseline} is missing: run `dvc repro attacker_baseline` first (attacks are judged against it)") from None
    found = [r["accuracy"] for r in rows if r["budget"] == budget]
    if not found:
        raise InvalidConfig(f"{paths.attacker_baseline} has no row for the attacker's budget {budget}: re-run `dvc repro attacker_baseline`")
    return float(found[0])


def summarise(df: pd.DataFrame) -> dict:
    """Tracing over the attacks that were worth it and stayed within 2 points of the copy
    (where tracing must hold), over the other worth-it ones, and over the rest."""
    worth = df["worth_it"].astype(bool)
    close = (df["copy_accuracy"] - df["accuracy"]) * 100 <= WITHIN_POINTS
    return {
        "worth_it_within_2pt": tracing_summary(df[worth & close]),
        "worth_it_beyond_2pt": tracing_summary(df[worth & ~close]),
        "not_worth_it": tracing_summary(df[~worth]),
    }


COPY_SOURCES = ("files", "registry")


def load_copies(paths: Paths, customers: list[str], source: str) -> dict[str, SplitNet]:
    """The issued copies, by customer id: the delivered files (``files``, what DVC tracks)
    or the registry's current versions (``registry``, ``models:/securemark-customer@customer-<id>``)."""
    if source == "files":
        files = {c: paths.customer_copy(c) for c in customers}
        return {c: load_weights(p) for c, p in sorted(files.items()) if p.is_file()}
    if source == "registry":
        return {c: load_registered(f"models:/{CUSTOMER_MODEL}@customer-{c}") for c in sorted(customers)}
    raise InvalidConfig(f"copies source must be one of {COPY_SOURCES}, got {source!r}")


@flow(name="attack-evaluation", validate_parameters=False)
def attack_flow(paths: Paths, settings: Settings, source: str = "files") -> dict:
    """Run the settings' attack grid against the issued copies (from ``source``), one task
    per attack family on the flow's task runner; trace every attacked model."""
    logger = get_run_logger()
    cfg = settings.attack
    tracking.configure(paths)
    vendor = open_vendor(paths, settings)
    indices = codebook_indices(vendor.codebook)
    copies = load_copies(paths, sorted(vendor.issued_codewords()), source)
    customers = sorted(copies)
    budgets = sorted({settings.attacker.budget} | {config.get("budget", settings.attacker.budget) for config in cfg.configs()})
    alone = {b: attacker_alone_accuracy(paths, b) for b in budgets}  # a budget without a baseline fails here, before any work
    data = {b: attacker_data(paths, settings, b) for b in budgets}
    test = test_set(paths)
    rng = np.random.default_rng(settings.base.seed)
    configs = cfg.configs()
    start = time.perf_counter()
    copy_accuracy = {c: vendor.copy_test_accuracy(m, test) for c, m in tqdm(copies.items(), desc="copies' accuracy", unit="copy")}
    calls = []
    for config in configs:  # coalitions are drawn here, in order, so results do not depend on scheduling
        if is_coalition(config):
            targets = [coalition for c in cfg.sizes_for(config) if c <= len(customers)
                       for coalition in draw_coalitions(rng, customers, c, cfg.trials)]
        else:
            targets = [[c] for c in customers[: config.get("targets", cfg.targets)]]
        involved = {c: copies[c] for t in targets for c in t}
        budget = config.get("budget", settings.attacker.budget)
        calls.append(((paths, settings, config, targets, involved, data[budget], test, {c: copy_accuracy[c] for c in involved}), {}))
    rows: list[dict] = []
    for family_rows in tqdm(results_in_order(run_family, calls, settings.ops), total=len(calls), desc="attack grid", unit="attack"):
        rows += family_rows
        name = family_rows[0]["attack"]
        frame = pd.DataFrame(family_rows)
        with tracking.run(f"attack-{name}-{family_rows[0]['strength']:g}", ATTACK_EXPERIMENT, paths, tags={"attack": name, "copies": source}):
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
            mlflow.log_metrics({"accuracy_mean": frame["accuracy"].mean(), "traced_fraction": float(traced(frame).mean()),
                                "traced_fraction_weights": float((frame["caught"] > 0).mean()),
                                "traced_fraction_api": float((frame["caught_api"] > 0).mean()),
                                "innocents_accused": int(innocents(frame).sum()), "ber_mean": frame["ber"].mean()})
            mlflow.log_table(frame, "attack_rows.json")
        logger.info("%s: %s", name, frame[["strength", "coalition_size", "accuracy", "ber", "caught", "caught_api", "innocents_accused"]].to_dict("records"))
    frame = pd.DataFrame(rows)
    df = worth_it(frame, frame["attacker_budget"].map(alone))[CSV_COLUMNS]
    summary = {
        "attacked_models": len(df),
        "innocents_accused_total": int(innocents(df).sum()),
        "copy_accuracy_mean": statistics.fmean(copy_accuracy.values()),
        "attacker_budget": settings.attacker.budget,
        "attacker_alone_accuracy": alone[settings.attacker.budget],
        "tracing": summarise(df),
        "tradeoff": tradeoff(df),
        "seconds": round(time.perf_counter() - start, 1),
        "customers_in_codebook": int(len(indices)),
        "epsilon": settings.trace.epsilon,
        "decoder": settings.trace.decoder,
    }
    artifacts.publish_table(artifacts.ATTACK_RESULTS, df.round(4).to_dict("records"),
                    f"Attack grid against {len(copies)} copies ({source}): accuracy, BER (aligned / raw), colluders caught, innocents accused")
    return {"rows": df, "summary": summary}


def run_attacks(paths: Paths, settings: Settings, source: str = "files") -> dict:
    """``attack_flow`` on the task runner the settings / environment ask for (the flow's thread or Dask)."""
    return attack_flow.with_options(task_runner=task_runner(settings.ops))(paths, settings, source)


def _stage(paths: Paths, settings: Settings) -> None:
    result = run_attacks(paths, settings)
    out = paths.attack_rows
    out.parent.mkdir(parents=True, exist_ok=True)
    result["rows"].to_csv(out, index=False, float_format="%.6g")
    tracking.write_json(result["summary"], paths.attack_summary)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="attack stage: the attack grid against issued copies, traced").parse_args(argv)
    stage_main(_stage)


if __name__ == "__main__":
    main()
