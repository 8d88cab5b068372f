"""Coalition APIs against the black-box channel: how many colluders each reading finds.

For each coalition (random issued copies) served as an API that answers every query
from a random member (``random``), by the members' majority vote (``vote``) or from
their averaged weights (``average``), traces the API with the vendor's keys (label-only,
in process) with and without reading on after the first accusation until the accused
explain ``--explain`` of the answers (``blackbox.explain``), and with more passes over the
keys (``--repeats``). Prints colluders caught, innocents accused and queries per trial.
Needs the outputs of ``dvc repro issue``; run from the repository root:

    python benchmarks/coalition_api.py --sizes 2 4 --trials 5 --explain 0.8
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch

from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.vendor import open_vendor
from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.attacks.serving import CoalitionAPI
from securemark.tracing.blackbox import label_api
from securemark.weights import load_weights

OUT = Path(__file__).resolve().parent / "results" / "coalition_api.json"


def averaged(models):
    """The coalition's averaged weights (what the ``average`` attack delivers)."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(s[k] for s in states) / len(states) if v.is_floating_point() else v for k, v in states[0].items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--explain", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(2)
    paths = Paths.from_env()
    settings = Settings.load(paths.params)
    vendor = open_vendor(paths, settings)
    issued = vendor.issued_codewords()
    copies = paths.issued_copies()
    probe = vendor.api_probe()
    readings = {"first accusation": dict(repeats=1, explain=0.0), f"explain {args.explain}": dict(repeats=1, explain=args.explain),
                f"explain {args.explain}, {args.repeats} passes": dict(repeats=args.repeats, explain=args.explain)}
    rows = []
    for mode in ("random", "vote", "average"):
        for c in args.sizes:
            rng = np.random.default_rng(c)  # the same coalitions for every reading
            coalitions = [rng.choice(len(copies), c, replace=False) for _ in range(args.trials)]
            for reading, options in readings.items():
                for trial, pick in enumerate(coalitions):
                    members = [load_weights(copies[i]) for i in pick]
                    guilty = {issued[copies[i].parent.name] for i in pick}
                    api = averaged(members) if mode == "average" else CoalitionAPI(members, mode, trial)
                    result = dataclasses.replace(probe, **options).trace(label_api(api), settings.trace.epsilon)
                    accused = {a.codeword_index for a in result.verdict.accused}
                    rows.append({"mode": mode, "c": c, "reading": reading, "trial": trial, "caught": len(accused & guilty),
                                 "innocents_accused": len(accused - guilty), "queries": result.queries})
                got = [r for r in rows if r["mode"] == mode and r["c"] == c and r["reading"] == reading]
                print(f"{mode} c={c} {reading}: caught {[r['caught'] for r in got]}, innocents {sum(r['innocents_accused'] for r in got)}, "
                      f"queries {[r['queries'] for r in got]}", flush=True)
    report(rows, args.out, one_line=False)


if __name__ == "__main__":
    main()
