"""The README's attack-grid table, printed as markdown from ``metrics/attacks.csv``.

One row per (attack, coalition size, strength): trials, mean accuracy, how many were
worth it and within 2 points of the copy, traced by the weights (and colluders caught
on average), traced by the API (and colluders caught on average), and the mean share
of keys answered with the first colluder's black-box word (chance: 0.5 for natural keys, whose
symbols are binary; 0.1 for patterns). Run from the
repository root after ``dvc repro attack``:

    python benchmarks/attack_table.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def table(rows: pd.DataFrame) -> str:
    rows = rows.assign(within=(rows["copy_accuracy"] - rows["accuracy"]) <= 0.02)
    lines = ["| attack | c | strength | trials | accuracy | worth it | within 2 pt | traced: weights (colluders caught, mean) "
             "| traced: API (colluders caught, mean) | key agr. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (attack, c, strength), g in rows.groupby(["attack", "coalition_size", "strength"], sort=False):
        n = len(g)
        lines.append(
            f"| `{attack}` | {c} | {strength:g} | {n} | {100 * g['accuracy'].mean():.2f} % | {int(g['worth_it'].sum())}/{n} "
            f"| {int(g['within'].sum())}/{n} | {int((g['caught'] > 0).sum())}/{n} ({g['caught'].mean():.2f}) "
            f"| {int((g['caught_api'] > 0).sum())}/{n} ({g['caught_api'].mean():.2f}) | {g['key_agreement'].mean():.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=Path("metrics/attacks.csv"))
    args = ap.parse_args()
    print(table(pd.read_csv(args.csv)))


if __name__ == "__main__":
    main()
