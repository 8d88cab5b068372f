"""Caught-vs-coalition-size curves for the plain and the peeling decoder.

Synthetic coalitions of an averaging attack on soft values: each copy carries
``y_j = s_j * a_j`` (s_j = 2 b_j - 1 its code word's signs, a_j >= margin its per-bit
magnitudes, as embedding leaves them), and averaging c copies gives ``mean_j y_j`` plus
estimation noise. Both decoders see the same coalitions. Prints one JSON line per
(code length, c) and saves all rows to ``benchmarks/results/decoders.json``.

    python benchmarks/decoders.py --lengths 304 512 --sizes 1 2 4 8 16 32 --trials 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.codes import create_code
from securemark.tracing import create_decoder

OUT = Path(__file__).resolve().parent / "results" / "decoders.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[304, 512])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--customers", type=int, default=1000)
    ap.add_argument("--family", default="random")
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--noise", type=float, default=0.03, help="std of per-bit estimation noise after averaging")
    ap.add_argument("--epsilon", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    for m in args.lengths:
        codebook = create_code(args.family, code_length=m).generate(args.customers, seed=args.seed)
        indices = np.arange(args.customers)
        for c in args.sizes:
            stats = {d: {"caught": [], "innocents": 0} for d in ("plain", "peeling")}
            for _ in range(args.trials):
                colluders = rng.choice(args.customers, size=c, replace=False)
                signs = 2.0 * codebook.words(colluders) - 1.0
                magnitudes = args.margin + np.abs(rng.normal(0, 0.03, signs.shape))
                y = (signs * magnitudes).mean(0) + rng.normal(0, args.noise, m)
                for name in stats:
                    accused = {a.codeword_index for a in create_decoder(name)(y, codebook, indices, args.epsilon).accused}
                    stats[name]["caught"].append(len(accused & set(colluders.tolist())))
                    stats[name]["innocents"] += len(accused - set(colluders.tolist()))
            row = {"code_length": m, "coalition_size": c, "trials": args.trials}
            for name, s in stats.items():
                caught = np.array(s["caught"])
                row[name] = {"caught_mean": float(caught.mean()), "trials_with_catch": int((caught > 0).sum()),
                             "all_caught": int((caught == c).sum()), "innocents_accused": s["innocents"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    report(rows, args.out, one_line=False)


if __name__ == "__main__":
    main()
