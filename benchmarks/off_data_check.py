"""The obfuscation check on real models: the off-data weight energy of the carrying layer
(``Extractor.off_data_ratio``: share outside the readout's excited directions, as a
multiple of the base model's) for copies, natural updates of them, and obfuscated
coalitions. Prints one line per model and saves ``benchmarks/results/off_data_check.json``.
Uses the pipeline's copies and vendor state; from the repository root:

    python benchmarks/off_data_check.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_state import load_pipeline_state  # noqa: E402  sibling module: scripts run as python benchmarks/<name>.py
from securemark.attacks import create_attack  # noqa: E402
from securemark.weights import load_weights  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "off_data_check.json"


def obfuscation(scale: float) -> dict:
    return {"attack": "obfuscate", "layers": ["server.dense1"], "directions": 392, "scale": scale, "samples": 2500}


CASES = [  # name, steps, how many copies
    ("average 8 > fine_tune 1", [{"attack": "average"}, {"attack": "fine_tune", "epochs": 1}], 8),
    ("average 8 > fine_tune 3", [{"attack": "average"}, {"attack": "fine_tune", "epochs": 3}], 8),
    ("fine_tune 5 (Adam)", [{"attack": "fine_tune", "epochs": 5}], 1),
    ("fine_tune 5 (SGD)", [{"attack": "fine_tune", "epochs": 5, "optimizer": "sgd", "lr": 0.01}], 1),
    ("prune 50 %", [{"attack": "prune", "rate": 0.5}], 1),
    ("prune 90 % > recovery 1", [{"attack": "prune", "rate": 0.9, "recovery_epochs": 1}], 1),
    ("quantize 8 bits", [{"attack": "quantize", "bits": 8}], 1),
    ("permute > rescale 100", [{"attack": "permute"}, {"attack": "rescale", "spread": 100.0}], 1),
    ("average 8 > fine_tune 1 > obfuscate 1x", [{"attack": "average"}, {"attack": "fine_tune", "epochs": 1}, obfuscation(1.0)], 8),
    ("average 8 > fine_tune 1 > obfuscate 3x", [{"attack": "average"}, {"attack": "fine_tune", "epochs": 1}, obfuscation(3.0)], 8),
    ("average 8 > obfuscate 3x > fine_tune 1", [{"attack": "average"}, obfuscation(3.0), {"attack": "fine_tune", "epochs": 1}], 8),
    ("average 8 > fine_tune 1 > obfuscate 10x", [{"attack": "average"}, {"attack": "fine_tune", "epochs": 1}, obfuscation(10.0)], 8),
    ("average 2 > fine_tune 1 > obfuscate 10x", [{"attack": "average"}, {"attack": "fine_tune", "epochs": 1}, obfuscation(10.0)], 2),
    ("prune 80 %", [{"attack": "prune", "rate": 0.8}], 1),
    ("noise 0.3", [{"attack": "noise", "scale": 0.3}], 1),
]


def main() -> None:
    state = load_pipeline_state()
    paths, settings, extractor, copies, data = state.paths, state.settings, state.extractor, state.copies, state.data
    names = sorted(state.issued)
    rows = []

    def record(name: str, model) -> None:
        aligned = extractor.aligned(model)[0]
        ratio, moved = extractor.off_data_ratio(aligned), extractor.readout_change(aligned)
        rows.append({"model": name, "off_data_ratio": ratio, "readout_change": moved, "flagged": extractor.obfuscated(aligned)})
        print(f"{name:45s} off-data {ratio:.3f}  readout change {moved:.3f}{'  FLAGGED' if rows[-1]['flagged'] else ''}", flush=True)

    record("base", extractor.reference)
    for name in names:
        record(f"copy {name}", copies[name])
    for budget in settings.attacker.budgets:
        record(f"attacker alone ({budget} images)", load_weights(paths.attacker_alone_model(budget)))
    generator = torch.Generator().manual_seed(0)
    for name, steps, count in CASES:
        record(name, create_attack("compose", steps=steps)([copies[n] for n in names[:count]], data, generator))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"limit": settings.trace.off_data_limit, "rows": rows}, indent=1))
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
