"""The attack grid: which attacks run against which copies, how an attacked model is
judged, and the attacker's trade-off table. Pure logic; the ``attack`` stage does the IO.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from securemark.attacks.base import attack_class
from securemark.codes import Codebook
from securemark.fingerprint import bit_error_rate
from securemark.model import accuracy
from securemark.tracing import Extractor, create_decoder

__all__ = ["expand_grid", "is_coalition", "draw_coalitions", "evaluate", "worth_it", "tracing_summary", "tradeoff", "compare_audits"]


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
    """Whether the attack starts by combining several copies (``average`` first)."""
    first = config["steps"][0]["attack"] if config["attack"] == "compose" else config["attack"]
    return first == "average"


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
) -> dict[str, float | int]:
    """Accuracy, mean BER over the colluders (after re-alignment, and of the raw weights)
    and the verdict of tracing the attacked model at ``epsilon``.

    ``codewords`` maps customer ids to their code-word index in ``codebook``. A model of
    another architecture (a distilled student) has no weights to read: BER is NaN and
    no one is accused.
    """
    if model.spec != extractor.spec:
        return {"accuracy": accuracy(model, *test), "ber": float("nan"), "ber_unaligned": float("nan"),
                "colluders": len(colluders), "caught": 0, "innocents_accused": 0}
    y, _ = extractor(model)
    raw = extractor.raw(model)

    def ber(values: np.ndarray) -> float:
        return float(np.mean([bit_error_rate(torch.as_tensor(values), codebook.word(codewords[c])) for c in colluders]))

    verdict = create_decoder(decoder)(y, codebook, indices, epsilon, scorer)
    accused = {c.codeword_index for c in verdict.accused}
    guilty = {codewords[c] for c in colluders}
    return {
        "accuracy": accuracy(model, *test),
        "ber": ber(y),
        "ber_unaligned": ber(raw),
        "colluders": len(colluders),
        "caught": len(accused & guilty),
        "innocents_accused": len(accused - guilty),
    }


def worth_it(rows: pd.DataFrame, attacker_alone_accuracy: float) -> pd.DataFrame:
    """``rows`` with ``attacker_alone_accuracy`` (at the attacker's budget) and ``worth_it``:
    the attacked model beats what the attacker builds alone, so leaking it paid."""
    out = rows.copy()
    out["attacker_alone_accuracy"] = attacker_alone_accuracy
    out["worth_it"] = out["accuracy"] > attacker_alone_accuracy
    return out


def tracing_summary(rows: pd.DataFrame) -> dict[str, Any]:
    """Tracing over a set of attacked models: how many, how many traced (at least one
    colluder caught), colluders caught of those involved, innocents accused."""
    return {
        "attacked_models": int(len(rows)),
        "traced": int((rows["caught"] > 0).sum()),
        "traced_fraction": float((rows["caught"] > 0).mean()) if len(rows) else None,
        "colluders_caught": int(rows["caught"].sum()),
        "colluders": int(rows["colluders"].sum()),
        "innocents_accused": int(rows["innocents_accused"].sum()),
        "accuracy_min": float(rows["accuracy"].min()) if len(rows) else None,
    }


def tradeoff(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Per attack family: the weakest strength at which tracing failed (some trial caught
    no colluder) and the attacker's accuracy there; ``None`` when tracing never failed."""
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
