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

from flows import artifacts, tracking
from flows.entry import stage_main
from flows.project import Paths, section
from flows.registry import CUSTOMER_MODEL, load_registered
from flows.scaleout import retry_unless_invalid, task_runner
from flows.trace import Extractor, ledger_indices, make_extractor, open_vendor
from flows.vendor import Vendor
from securemark.attacks import AttackData, create_attack
from securemark.fingerprint import bit_error_rate
from securemark.model import SplitNet, accuracy
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
            "innocents_accused": int(group["innocents_accused"].sum()),
            "accuracy_min": float(group["accuracy"].min()),
        })
    return table


def compare_audits(previous: list[dict] | None, current: list[dict]) -> list[dict]:
    """Per (attack, coalition size): traced fraction and worst accuracy now and at the
    previous audit, with a status: ``new``, ``same``, ``improved``, ``regressed`` (tracing
    caught fewer, or an innocent was accused where none was before) or ``gone``."""
    def key(row: dict) -> tuple[str, int]:
        return row["attack"], int(row["coalition_size"])

    before = {key(r): r for r in previous or []}
    now = {key(r): r for r in current}
    rows = []
    for k in sorted(set(before) | set(now)):
        old, new = before.get(k), now.get(k)
        if new is None:
            status = "gone"
        elif old is None:
            status = "new"
        else:
            worse = new["traced_fraction_overall"] < old["traced_fraction_overall"] or new.get("innocents_accused", 0) > old.get("innocents_accused", 0)
            better = new["traced_fraction_overall"] > old["traced_fraction_overall"]
            status = "regressed" if worse else "improved" if better else "same"
        rows.append({"attack": k[0], "coalition_size": k[1], "status": status,
                     "traced_now": None if new is None else new["traced_fraction_overall"],
                     "traced_before": None if old is None else old["traced_fraction_overall"],
                     "accuracy_min_now": None if new is None else new["accuracy_min"],
                     "accuracy_min_before": None if old is None else old["accuracy_min"]})
    return rows


@task(name="attack-family", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_invalid, task_run_name="attack-{config[attack]}")
def run_family(config: dict, targets: list[list[str]], copies: dict, vendor: Vendor, extractor: Extractor, indices, ledger, data, test, epsilon, scorer, decoder, seed) -> list[dict]:
    attack = create_attack(config["attack"], **{k: v for k, v in config.items() if k != "attack"})
    rows = []
    for trial, coalition in enumerate(targets):
        generator = torch.Generator().manual_seed(seed + trial)
        attacked = attack([copies[c] for c in coalition], data, generator)
        rows.append({"attack": attack.name, "strength": float(attack.strength), "coalition_size": len(coalition), "trial": trial,
                     **evaluate(attacked, coalition, vendor, extractor, indices, ledger, test, epsilon, scorer, decoder)})
    return rows


def load_copies(paths: Paths, vendor: Vendor, source: str) -> dict[str, SplitNet]:
    """The issued copies, by customer id: the delivered files (``files``, what DVC tracks)
    or the registry's current versions (``registry``, ``models:/securemark-customer@customer-<id>``)."""
    issued = [r.customer_id for r in vendor.ledger.records("issued")]
    if source == "files":
        files = {c: paths.root / "data" / "customers" / c / "model.safetensors" for c in issued}
        return {c: load_weights(p) for c, p in sorted(files.items()) if p.is_file()}
    if source == "registry":
        return {c: load_registered(f"models:/{CUSTOMER_MODEL}@customer-{c}") for c in sorted(issued)}
    raise ValueError(f"copies source must be 'files' or 'registry', got {source!r}")


@flow(name="attack-evaluation")
def attack_flow(paths: Paths, params: dict, source: str = "files") -> dict:
    """Run the params' attack grid against the issued copies (from ``source``), one task
    per attack family on the flow's task runner; trace every attacked model."""
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
    copies = load_copies(paths, vendor, source)
    customers = sorted(copies)
    attacker = read_partition(paths.partition("attacker"))
    data = AttackData(attacker.as_float(), attacker.labels)
    test_part = read_partition(paths.partition("test"))
    test = (test_part.as_float(), test_part.labels)
    rng = np.random.default_rng(seed)
    configs = expand_grid(cfg["grid"])
    start = time.perf_counter()
    futures = []
    for config in configs:  # coalitions are drawn here, in order, so results do not depend on scheduling
        if is_coalition(config):
            targets = [coalition for c in cfg["coalition_sizes"] if c <= len(customers)
                       for coalition in draw_coalitions(rng, customers, c, int(cfg["trials"]))]
        else:
            targets = [[c] for c in customers[: int(cfg["targets"])]]
        involved = {c: copies[c] for t in targets for c in t}
        futures.append(run_family.submit(config, targets, involved, vendor, extractor, indices, ledger, data, test, epsilon, scorer, decoder, seed))
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
        "copy_accuracy_mean": statistics.fmean(accuracy(m, *test) for m in list(copies.values())[: int(cfg["targets"])]),
        "tradeoff": tradeoff(df),
        "seconds": round(time.perf_counter() - start, 1),
        "customers_in_codebook": int(len(indices)),
        "epsilon": epsilon,
        "decoder": decoder,
    }
    artifacts.table(artifacts.ATTACK_RESULTS, df.round(4).to_dict("records"),
                    f"Attack grid against {len(copies)} copies ({source}): accuracy, BER (aligned / raw), colluders caught, innocents accused")
    return {"rows": df, "summary": summary}


def run_attacks(paths: Paths, params: dict, source: str = "files") -> dict:
    """``attack_flow`` on the task runner params/env ask for (thread pool or Dask)."""
    return attack_flow.with_options(task_runner=task_runner(params))(paths, params, source)


def _stage(paths: Paths, params: dict) -> None:
    result = run_attacks(paths, params)
    out = paths.metrics / "attacks.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["rows"].to_csv(out, index=False, float_format="%.6g")
    tracking.write_json(result["summary"], paths.metrics / "attacks.json")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="attack stage: the attack grid against issued copies, traced").parse_args(argv)
    stage_main(_stage)


if __name__ == "__main__":
    main()
