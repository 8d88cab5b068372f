"""The attack aimed at the drift-whitened reading, and the remedy that did not work.

An attacker who has read the design averages ``c`` copies, fine-tunes one epoch and adds
noise in the directions its own data barely excites (``obfuscate`` on the carrying layer
``server.dense1``: where natural updates do not go). For each coalition size and noise
scale, prints one line per attacked model (test accuracy, colluders caught, what each
reading accused) and saves everything to ``benchmarks/results/coalition_obfuscate.json``.

``--remedy`` also scores every attacked model under a drift model refitted with
obfuscation added to the simulated updates (the pipeline's ``trace.drift_recipes`` plus
obfuscate recipes), to test whether whitening that expects the noise recovers the trace.

Uses the pipeline's copies and vendor state (run ``dvc repro issue trace`` first); from
the repository root:

    python benchmarks/coalition_obfuscate.py --remedy
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.adapters.partitions import read_partition  # noqa: E402
from flows.adapters.paths import Paths  # noqa: E402
from flows.adapters.settings import Settings, attack_options  # noqa: E402
from pipeline_state import load_pipeline_state  # noqa: E402  sibling module: scripts run as python benchmarks/<name>.py
from securemark.attacks import create_attack  # noqa: E402
from securemark.attacks.base import AttackData  # noqa: E402
from securemark.evaluation.grid import draw_coalitions  # noqa: E402
from securemark.fingerprint import effective_weight, extract  # noqa: E402
from securemark.model import accuracy  # noqa: E402
from securemark.tracing import codebook_indices, decide_readings, fit_drift  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "coalition_obfuscate.json"


def obfuscation(scale: float, directions: int = 392) -> dict:
    return {"attack": "obfuscate", "layers": ["server.dense1"], "directions": directions, "scale": scale, "samples": 2500}


REMEDY_RECIPES = [obfuscation(3.0), obfuscation(3.0, 128), obfuscation(10.0, 64),
                  {"attack": "compose", "steps": [{"attack": "fine_tune", "epochs": 1}, obfuscation(2.0)]}]


def remedy_drift(paths: Paths, settings: Settings, extractor, per_recipe: int):
    """The drift model refitted to the pipeline's recipes plus :data:`REMEDY_RECIPES`,
    ``per_recipe`` updates of the base model each (vendor data only, as in the pipeline)."""
    aux = read_partition(paths.partition("aux"))
    images, labels = aux.as_float(), aux.labels
    generator = torch.Generator().manual_seed(settings.base.seed + 1)
    updates = []
    for recipe in list(settings.trace.drift_recipes) + REMEDY_RECIPES:
        for _ in range(per_recipe):
            pick = torch.randperm(len(labels), generator=generator)[: settings.attacker.budget]
            updated = create_attack(recipe["attack"], **attack_options(recipe))([extractor.reference], AttackData(images[pick], labels[pick]), generator)
            aligned, _ = extractor.aligned(updated)
            with torch.no_grad():
                updates.append(extractor.readout.features(aligned).detach().to(torch.float64))
        print(f"remedy drift model: {per_recipe} updates of {recipe}", flush=True)
    rows = int(effective_weight(extractor.reference, settings.fingerprint.embed.layer).shape[0])
    return fit_drift(torch.stack(updates), rows, settings.trace.drift_shrink)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--remedy", action="store_true", help="also score under a drift model fitted with obfuscation in its recipes")
    parser.add_argument("--per-recipe", type=int, default=6)
    args = parser.parse_args()
    state = load_pipeline_state()
    paths, settings, vendor, extractor = state.paths, state.settings, state.vendor, state.extractor
    issued, copies, data, test = state.issued, state.copies, state.data, state.test
    codebook = vendor.codebook
    indices = codebook_indices(codebook)
    remedy = remedy_drift(paths, settings, extractor, args.per_recipe) if args.remedy else None
    rng = np.random.default_rng(5)
    rows = []
    for size in args.sizes:
        coalitions = draw_coalitions(rng, sorted(copies), size, args.trials) if size > 1 else [[c] for c in sorted(copies)[: args.trials]]
        for scale in args.scales:
            steps = ([{"attack": "average"}] if size > 1 else []) + [{"attack": "fine_tune", "epochs": 1}, obfuscation(scale)]
            attack = create_attack("compose", steps=steps)
            for trial, coalition in enumerate(coalitions):
                start = time.perf_counter()
                model = attack([copies[c] for c in coalition], data, torch.Generator().manual_seed(1000 * size + trial))
                aligned, _ = extractor.aligned(model)
                readings = extractor.readings(aligned)
                verdict = decide_readings(readings, codebook, indices, settings.trace.epsilon, settings.trace.scorer, settings.trace.decoder)
                guilty = {issued[c] for c in coalition}
                accused = {a.codeword_index for a in verdict.accused}
                row = {"coalition_size": size, "scale": scale, "trial": trial, "accuracy": accuracy(model, *test),
                       "caught": len(accused & guilty), "innocents_accused": len(accused - guilty), "readings": verdict.readings}
                if remedy is not None:
                    y = extract(aligned, extractor.readout, vendor.key_matrix, whiten=remedy.whiten)["drift"].numpy()
                    both = decide_readings({"plain": readings["plain"], "remedy": y}, codebook, indices, settings.trace.epsilon,
                                           settings.trace.scorer, settings.trace.decoder)
                    row["remedy_caught"] = len({a.codeword_index for a in both.accused} & guilty)
                    row["remedy_innocents_accused"] = len({a.codeword_index for a in both.accused} - guilty)
                rows.append(row)
                print(f"c={size:2d} scale={scale:4.1f} trial={trial} accuracy={row['accuracy']:.4f} caught={row['caught']}/{size} "
                      f"innocents={row['innocents_accused']} readings={verdict.readings}"
                      + (f" remedy caught={row['remedy_caught']}/{size} innocents={row['remedy_innocents_accused']}" if remedy else "")
                      + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"attack": "average > fine_tune 1 epoch > obfuscate server.dense1 (392 directions)",
                                   "remedy_recipes": REMEDY_RECIPES if remedy else None, "rows": rows}, indent=1))
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
