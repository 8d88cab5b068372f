"""The attack grid: which attacks run against which copies, how an attacked model is
judged, and the attacker's trade-off table. Pure logic; the ``attack`` stage does the IO.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from securemark.attacks.base import attack_class
from securemark.tracing.blackbox import ApiProbe, agreement, label_api
from securemark.codes import Codebook
from securemark.fingerprint import bit_error_rate
from securemark.model import accuracy
from securemark.tracing import Extractor, decide_readings

if TYPE_CHECKING:  # the summaries take data frames; reading a grid entry or judging a model does not need pandas
    import pandas as pd

__all__ = ["expand_grid", "is_coalition", "draw_coalitions", "evaluate", "api_columns", "traced", "innocents", "worth_it", "tracing_summary", "tradeoff", "compare_audits"]


def expand_grid(grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One config per combination: list-valued keys expand, except the options an attack
    takes as a list (``Attack.list_options``, e.g. compose's ``steps``)."""
    configs = []
    for entry in grid:
        entry = dict(entry)
        kept = attack_class(entry["attack"]).list_options if "attack" in entry else ()
        keys = [k for k, v in entry.items() if isinstance(v, list) and k not in kept]
        for values in itertools.product(*(entry[k] for k in keys)):
            configs.append({**entry, **dict(zip(keys, values))})
    return configs


def is_coalition(config: dict[str, Any]) -> bool:
    """Whether the attack starts by combining several copies (``average``,
    ``serve_coalition``, or a composition starting with one of them)."""
    first = config["steps"][0]["attack"] if config["attack"] == "compose" else config["attack"]
    return attack_class(first).coalition


def draw_coalitions(rng: np.random.Generator, customers: list[str], size: int, trials: int) -> list[list[str]]:
    """``trials`` distinct random coalitions of ``size`` customers (fewer when fewer exist)."""
    possible = math.comb(len(customers), size)
    drawn: list[list[str]] = []
    while len(drawn) < min(trials, possible):
        coalition = sorted(rng.choice(customers, size=size, replace=False).tolist())
        if coalition not in drawn:
            drawn.append(coalition)
    return drawn


def evaluate(
    model,
    colluders: list[str],
    codebook: Codebook,
    codewords: dict[str, int],
    extractor: Extractor,
    indices: np.ndarray,
    test: tuple[torch.Tensor, torch.Tensor],
    epsilon: float,
    scorer: str,
    decoder: str,
    api: ApiProbe | None = None,
) -> dict[str, float | int | str]:
    """Accuracy, mean BER over the colluders (after re-alignment, and of the raw weights)
    and the verdict of tracing the attacked model at ``epsilon`` through each channel:
    its weights (white-box) and, with ``api``, its label-only answers to the black-box
    keys (the model served as a prediction API).

    ``codewords`` maps customer ids to their code-word index in ``codebook`` (and in
    ``api.codebook``). A model of another architecture (a distilled student) has no
    weights to read: BER is NaN and the weights channel accuses no one.
    """
    row: dict[str, float | int | str] = {"accuracy": accuracy(model, *test), "colluders": len(colluders)}
    guilty = {codewords[c] for c in colluders}
    if model.spec != extractor.spec:
        row.update(ber=float("nan"), ber_unaligned=float("nan"), caught=0, innocents_accused=0, off_data_ratio=float("nan"), obfuscated=False)
    else:
        aligned, _ = extractor.aligned(model)
        readings = extractor.readings(aligned)
        y = readings["plain"]
        raw = extractor.raw(model)

        def ber(values: np.ndarray) -> float:
            return float(np.mean([bit_error_rate(torch.as_tensor(values), codebook.word(codewords[c])) for c in colluders]))

        verdict = decide_readings(readings, codebook, indices, epsilon, scorer, decoder)
        accused = {c.codeword_index for c in verdict.accused}
        row.update(ber=ber(y), ber_unaligned=ber(raw), caught=len(accused & guilty), innocents_accused=len(accused - guilty),
                   off_data_ratio=extractor.off_data_ratio(aligned),  # the obfuscation check (tracing/tamper.py)
                   obfuscated=extractor.obfuscated(aligned))
    row.update(api_columns(model, colluders, codewords, api, epsilon))
    row["traced_by"] = {(True, True): "both", (True, False): "weights", (False, True): "api", (False, False): "none"}[
        (row["caught"] > 0, row["caught_api"] > 0)]
    return row


def api_columns(model, colluders: list[str], codewords: dict[str, int], api: ApiProbe | None, epsilon: float) -> dict[str, float | int]:
    """The black-box channel: colluders caught and innocents accused by tracing the
    model's label-only answers, the queries the sequential trace spent, and the fraction
    of keys answered with the first colluder's target (how much of its black-box word
    the attacked model still carries; 1/10 is chance)."""
    if api is None:
        return {"caught_api": 0, "innocents_accused_api": 0, "queries_api": 0, "key_agreement": float("nan")}
    ask = label_api(model)
    result = api.trace(ask, epsilon)
    accused = {c.codeword_index for c in result.verdict.accused}
    guilty = {codewords[c] for c in colluders}
    return {
        "caught_api": len(accused & guilty),
        "innocents_accused_api": len(accused - guilty),
        "queries_api": int(result.queries),
        "key_agreement": agreement(api.keys, api.codebook.word(codewords[colluders[0]]), ask(api.keys.images)),
    }


def traced(rows: pd.DataFrame) -> pd.Series:
    """Whether each attacked model was traced (a colluder caught) by either channel."""
    caught = rows["caught"] > 0
    return caught | (rows["caught_api"] > 0) if "caught_api" in rows else caught


def innocents(rows: pd.DataFrame) -> pd.Series:
    """Innocent customers accused per attacked model, both channels together."""
    return rows["innocents_accused"] + (rows["innocents_accused_api"] if "innocents_accused_api" in rows else 0)


def worth_it(rows: pd.DataFrame, attacker_alone_accuracy: float) -> pd.DataFrame:
    """``rows`` with ``attacker_alone_accuracy`` (at the attacker's budget) and ``worth_it``:
    the attacked model beats what the attacker builds alone, so leaking it paid."""
    out = rows.copy()
    out["attacker_alone_accuracy"] = attacker_alone_accuracy
    out["worth_it"] = out["accuracy"] > attacker_alone_accuracy
    return out


def tracing_summary(rows: pd.DataFrame) -> dict[str, Any]:
    """Tracing over a set of attacked models: how many, how many traced (at least one
    colluder caught, by either channel; and by each), colluders caught of those
    involved, innocents accused, and how many of the untraced ones the obfuscation check
    flags (their trace ends inconclusive, not clean)."""
    hit = traced(rows)
    import pandas as pd

    flagged = rows["obfuscated"].astype(bool) if "obfuscated" in rows else pd.Series(False, index=rows.index)
    return {
        "untraced_flagged_obfuscated": int((~hit & flagged).sum()),
        "attacked_models": int(len(rows)),
        "traced": int(hit.sum()),
        "traced_fraction": float(hit.mean()) if len(rows) else None,
        "traced_weights": int((rows["caught"] > 0).sum()),
        "traced_api": int((rows["caught_api"] > 0).sum()) if "caught_api" in rows else 0,
        "colluders_caught": int(rows[["caught", "caught_api"]].max(axis=1).sum()) if "caught_api" in rows else int(rows["caught"].sum()),
        "colluders": int(rows["colluders"].sum()),
        "innocents_accused": int(innocents(rows).sum()),
        "accuracy_min": float(rows["accuracy"].min()) if len(rows) else None,
    }


def tradeoff(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Per attack family: the weakest strength at which tracing failed (some trial caught
    no colluder) and the attacker's accuracy there; ``None`` when tracing never failed."""
    table = []
    df = df.assign(_traced=traced(df), _innocents=innocents(df))
    for (attack, size), group in df.groupby(["attack", "coalition_size"], sort=True):
        by_strength = group.groupby("strength").agg(traced=("_traced", "mean"), accuracy=("accuracy", "mean"))
        failed = by_strength[by_strength["traced"] < 1.0]
        first = failed.index.min() if len(failed) else None
        table.append({
            "attack": attack,
            "coalition_size": int(size),
            "weakest_failing_strength": None if first is None else float(first),
            "accuracy_at_failure": None if first is None else float(failed.loc[first, "accuracy"]),
            "traced_fraction_overall": float(group["_traced"].mean()),
            "innocents_accused": int(group["_innocents"].sum()),
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
