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
import itertools
import math
import statistics
import time

import mlflow
import numpy as np
import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from flows import tracking
from flows.entry import stage_main
from flows.project import Paths, section
from flows.trace import Extractor, ledger_indices, make_extractor, open_vendor
from flows.vendor import Vendor
from securemark.attacks import AttackData, create_attack
from securemark.fingerprint import bit_error_rate
from securemark.model import accuracy
from securemark.storage import read_partition
from securemark.tracing import create_decoder
from securemark.weights import load_weights

ATTACK_EXPERIMENT = "securemark-attacks"
CSV_COLUMNS = ["attack", "strength", "coalition_size", "trial", "accuracy", "ber", "ber_unaligned", "colluders", "caught", "innocents_accused"]


def expand_grid(grid: list[dict]) -> list[dict]:
    """One config per combination: list-valued keys (except compose's ``steps``) expand."""
    configs = []
    for entry in grid:
        entry = dict(entry)
        keys = [k for k, v in entry.items() if isinstance(v, list) and k != "steps"]
        for values in itertools.product(*(entry[k] for k in keys)):
            configs.append({**entry, **dict(zip(keys, values))})
    return configs


def is_coalition(config: dict) -> bool:
    first = config["steps"][0]["attack"] if config["attack"] == "compose" else config["attack"]
    return first == "average"


def evaluate(model, colluders: list[str], vendor: Vendor, extractor: Extractor, indices: np.ndarray, ledger: dict, test, epsilon: float, scorer: str, decoder: str) -> dict:
    """Accuracy, mean BER over the colluders (after re-alignment, and of the raw weights)
    and the verdict of tracing the attacked model at ``epsilon``."""
    y, _ = extractor(model)
    raw = extractor.raw(model)

    def ber(values: np.ndarray) -> float:
        return float(np.mean([bit_error_rate(torch.as_tensor(values), vendor.codebook.word(ledger[c])) for c in colluders]))

    verdict = create_decoder(decoder)(y, vendor.codebook, indices, epsilon, scorer)
    accused = {c.codeword_index for c in verdict.accused}
    guilty = {ledger[c] for c in colluders}
    return {
        "accuracy": accuracy(model, *test),
        "ber": ber(y),
        "ber_unaligned": ber(raw),
        "colluders": len(colluders),
        "caught": len(accused & guilty),
        "innocents_accused": len(accused - guilty),
    }


def draw_coalitions(rng: np.random.Generator, customers: list[str], size: int, trials: int) -> list[list[str]]:
    """``trials`` distinct random coalitions of ``size`` customers (fewer when fewer exist)."""
    possible = math.comb(len(customers), size)
    drawn: list[list[str]] = []
    while len(drawn) < min(trials, possible):
        coalition = sorted(rng.choice(customers, size=size, replace=False).tolist())
        if coalition not in drawn:
            drawn.append(coalition)
    return drawn


def tradeoff(df: pd.DataFrame) -> list[dict]:
    """Per attack family: the weakest strength at which tracing failed (some trial caught
    no colluder) and the attacker's accuracy there; ``null`` when tracing never failed."""
    table = []
    for (attack, size), group in df.groupby(["attack", "coalition_size"], sort=True):
        by_strength = group.groupby("strength").agg(traced=("caught", lambda c: float((c > 0).mean())), accuracy=("accuracy", "mean"))
        failed = by_strength[by_strength["traced"] < 1.0]
        first = failed.index.min() if len(failed) else None
        table.append({
            "attack": attack,
            "coalition_size": int(size),
            "weakest_failing_strength": None if first is None else float(first),
            "accuracy_at_failure": None if first is None else float(failed.loc[first, "accuracy"]),
            "traced_fraction_overall": float((group["caught"] > 0).mean()),
            "accuracy_min": float(group["accuracy"].min()),
        })
    return table


@task(name="attack-family", cache_policy=NO_CACHE)
def run_family(config: dict, targets: list[list[str]], copies: dict, vendor: Vendor, extractor: Extractor, indices, ledger, data, test, epsilon, scorer, decoder, seed) -> list[dict]:
    attack = create_attack(config["attack"], **{k: v for k, v in config.items() if k != "attack"})
    rows = []
    for trial, coalition in enumerate(targets):
        generator = torch.Generator().manual_seed(seed + trial)
        attacked = attack([copies[c] for c in coalition], data, generator)
        rows.append({"attack": attack.name, "strength": float(attack.strength), "coalition_size": len(coalition), "trial": trial,
                     **evaluate(attacked, coalition, vendor, extractor, indices, ledger, test, epsilon, scorer, decoder)})
    return rows


@flow(name="attack-evaluation")
def attack_flow(paths: Paths, params: dict) -> dict:
    logger = get_run_logger()
    cfg = section(params, "attack")
    seed = int(section(params, "base")["seed"])
    trace_cfg = params.get("trace", {})
    epsilon, scorer = float(trace_cfg.get("epsilon", 1e-6)), trace_cfg.get("scorer", "correlation")
    decoder = trace_cfg.get("decoder", "peeling")
    tracking.configure(paths)
    vendor, spec = open_vendor(paths, params)
    extractor = make_extractor(paths, params, vendor, spec)
    indices = ledger_indices(vendor)
    ledger = {r.customer_id: r.codeword_index for r in vendor.ledger.records("issued")}
    copy_files = {p.parent.name: p for p in sorted((paths.root / "data" / "customers").glob("*/model.safetensors")) if p.parent.name in ledger}
    copies = {c: load_weights(p) for c, p in copy_files.items()}
    customers = sorted(copies)
    attacker = read_partition(paths.partition("attacker"))
    data = AttackData(attacker.as_float(), attacker.labels)
    test_part = read_partition(paths.partition("test"))
    test = (test_part.as_float(), test_part.labels)
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    configs = expand_grid(cfg["grid"])
    start = time.perf_counter()
    for config in tqdm(configs, desc="attack grid", unit="attack"):
        if is_coalition(config):
            targets = [coalition for c in cfg["coalition_sizes"] if c <= len(customers)
                       for coalition in draw_coalitions(rng, customers, c, int(cfg["trials"]))]
        else:
            targets = [[c] for c in customers[: int(cfg["targets"])]]
        family_rows = run_family(config, targets, copies, vendor, extractor, indices, ledger, data, test, epsilon, scorer, decoder, seed)
        rows += family_rows
        name = family_rows[0]["attack"]
        with tracking.run(f"attack-{name}-{family_rows[0]['strength']:g}", ATTACK_EXPERIMENT, paths, tags={"attack": name}):
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
            frame = pd.DataFrame(family_rows)
            mlflow.log_metrics({"accuracy_mean": frame["accuracy"].mean(), "traced_fraction": float((frame["caught"] > 0).mean()),
                                "innocents_accused": int(frame["innocents_accused"].sum()), "ber_mean": frame["ber"].mean()})
            mlflow.log_table(frame, "attack_rows.json")
        logger.info("%s: %s", name, frame[["strength", "coalition_size", "accuracy", "ber", "caught", "innocents_accused"]].to_dict("records"))
    df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    summary = {
        "attacked_models": len(df),
        "innocents_accused_total": int(df["innocents_accused"].sum()),
        "copy_accuracy_mean": statistics.fmean(accuracy(m, *test) for m in list(copies.values())[: int(cfg["targets"])]),
        "tradeoff": tradeoff(df),
        "seconds": round(time.perf_counter() - start, 1),
        "customers_in_codebook": int(len(indices)),
        "epsilon": epsilon,
        "decoder": decoder,
    }
    return {"rows": df, "summary": summary}


def _stage(paths: Paths, params: dict) -> None:
    result = attack_flow(paths, params)
    out = paths.metrics / "attacks.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["rows"].to_csv(out, index=False, float_format="%.6g")
    tracking.write_json(result["summary"], paths.metrics / "attacks.json")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="attack stage: the attack grid against issued copies, traced").parse_args(argv)
    stage_main(_stage)


if __name__ == "__main__":
    main()
