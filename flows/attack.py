"""``attack`` stage: what customers may do before leaking, and whether tracing survives.

Runs the grid in ``params.yaml`` (section ``attack``) against the issued copies:
single-copy attacks against ``attack.targets`` copies each, coalition attacks
(``average`` and compositions starting with it) against random coalitions of every
size in ``attack.coalition_sizes``, ``attack.trials`` each. Every attacked model is
evaluated (test accuracy, BER against each involved customer) and traced at the
default epsilon. Writes ``metrics/attacks.csv`` (one row per attacked model),
``metrics/attacks.json`` (summary and the attacker's trade-off table) and logs one
MLflow run per attack family.
"""

from __future__ import annotations

import argparse
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
from flows.adapters.paths import Paths
from flows.adapters.scaleout import retry_unless_invalid, task_runner
from flows.adapters.settings import Settings
from flows.adapters.vendor import Vendor, make_extractor
from flows.entry.stage import stage_main
from securemark.attacks import AttackData, create_attack
from securemark.attacks.grid import draw_coalitions, evaluate, is_coalition, tradeoff
from securemark.errors import InvalidConfig
from securemark.model import SplitNet, accuracy
from securemark.storage import read_partition
from securemark.tracing import codebook_indices
from securemark.weights import load_weights

ATTACK_EXPERIMENT = "securemark-attacks"
CSV_COLUMNS = ["attack", "strength", "coalition_size", "trial", "accuracy", "ber", "ber_unaligned", "colluders", "caught", "innocents_accused"]


@task(name="attack-family", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_invalid, task_run_name="attack-{config[attack]}")
def run_family(paths: Paths, settings: Settings, config: dict, targets: list[list[str]], copies: dict[str, SplitNet], data: AttackData,
               test: tuple[torch.Tensor, torch.Tensor]) -> list[dict]:
    """One attack family against its targets (copies or coalitions), each attacked model
    evaluated and traced. Opens the vendor's state itself: no secret travels as an argument."""
    attack = create_attack(config["attack"], **{k: v for k, v in config.items() if k != "attack"})
    vendor = Vendor.open(paths, settings)
    extractor = make_extractor(paths, settings, vendor)
    indices, codewords, trace = codebook_indices(vendor.codebook), vendor.issued_codewords(), settings.trace
    rows = []
    for trial, coalition in enumerate(targets):
        generator = torch.Generator().manual_seed(settings.base.seed + trial)
        attacked = attack([copies[c] for c in coalition], data, generator)
        rows.append({"attack": attack.name, "strength": float(attack.strength), "coalition_size": len(coalition), "trial": trial,
                     **evaluate(attacked, coalition, vendor.codebook, codewords, extractor, indices, test, trace.epsilon, trace.scorer, trace.decoder)})
    return rows


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
    vendor = Vendor.open(paths, settings)
    indices = codebook_indices(vendor.codebook)
    copies = load_copies(paths, sorted(vendor.issued_codewords()), source)
    customers = sorted(copies)
    attacker = read_partition(paths.partition("attacker"))
    data = AttackData(attacker.as_float(), attacker.labels)
    test_part = read_partition(paths.partition("test"))
    test = (test_part.as_float(), test_part.labels)
    rng = np.random.default_rng(settings.base.seed)
    configs = cfg.configs()
    start = time.perf_counter()
    futures = []
    for config in configs:  # coalitions are drawn here, in order, so results do not depend on scheduling
        if is_coalition(config):
            targets = [coalition for c in cfg.coalition_sizes if c <= len(customers)
                       for coalition in draw_coalitions(rng, customers, c, cfg.trials)]
        else:
            targets = [[c] for c in customers[: cfg.targets]]
        involved = {c: copies[c] for t in targets for c in t}
        futures.append(run_family.submit(paths, settings, config, targets, involved, data, test))
    rows: list[dict] = []
    for config, future in tqdm(list(zip(configs, futures)), desc="attack grid", unit="attack"):
        family_rows = future.result()
        rows += family_rows
        name = family_rows[0]["attack"]
        frame = pd.DataFrame(family_rows)
        with tracking.run(f"attack-{name}-{family_rows[0]['strength']:g}", ATTACK_EXPERIMENT, paths, tags={"attack": name, "copies": source}):
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
            mlflow.log_metrics({"accuracy_mean": frame["accuracy"].mean(), "traced_fraction": float((frame["caught"] > 0).mean()),
                                "innocents_accused": int(frame["innocents_accused"].sum()), "ber_mean": frame["ber"].mean()})
            mlflow.log_table(frame, "attack_rows.json")
        logger.info("%s: %s", name, frame[["strength", "coalition_size", "accuracy", "ber", "caught", "innocents_accused"]].to_dict("records"))
    df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    summary = {
        "attacked_models": len(df),
        "innocents_accused_total": int(df["innocents_accused"].sum()),
        "copy_accuracy_mean": statistics.fmean(accuracy(m, *test) for m in list(copies.values())[: cfg.targets]),
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
    """``attack_flow`` on the task runner the settings / environment ask for (thread pool or Dask)."""
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
