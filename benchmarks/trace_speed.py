"""Time tracing at ledger scale: score every customer of a large Tardos code book.

Generates a symmetric Tardos code book (default 1,000,000 customers x 512 bits),
times ``score_all`` (best of 3) for one extracted fingerprint, prints one JSON line
and writes it to ``benchmarks/results/trace_speed.json``.

    python benchmarks/trace_speed.py --customers 1000000 --code-length 512
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.codes import create_code
from securemark.scoring import create_scorer, score_all

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "trace_speed.json"


def run(customers: int, code_length: int, seed: int = 0, repeats: int = 3) -> dict:
    """Generate the code book, time ``score_all``; return the measurements."""
    start = time.perf_counter()
    book = create_code("tardos", code_length=code_length).generate(customers, seed=seed)
    generate_seconds = time.perf_counter() - start

    y = np.random.default_rng(seed + 1).standard_normal(code_length)  # stands in for extracted soft values
    w = create_scorer("correlation").weights(y)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        score_all(book, w)
        best = min(best, time.perf_counter() - start)
    return {
        "customers": customers,
        "code_length": code_length,
        "seconds": round(best, 4),
        "generate_seconds": round(generate_seconds, 3),
        "packed_mb": round(book.packed.nbytes / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--code-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    result = run(args.customers, args.code_length, args.seed)
    report(result, args.output)


if __name__ == "__main__":
    main()
