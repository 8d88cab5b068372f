"""The attack aimed at the obfuscation check: replace instead of add.

The check (``src/securemark/tracing/tamper.py``) flags an update of the base model whose
carrying layer holds much more weight energy outside the directions the data excites than
the base did. An attacker who has read it averages ``c`` copies, fine-tunes one epoch and
then, in the directions its own data barely excites (as ``obfuscate`` finds them), **swaps**
the weights' component for Gaussian noise of ``scale`` times that component's norm: with
scale 1 the off-data energy stays what it was, so the check sees nothing. Prints, per
coalition, accuracy, colluders caught, the off-data share and whether the check flags it;
saves ``benchmarks/results/off_data_evasion.json``. Uses the pipeline's copies and vendor
state; from the repository root:

    python benchmarks/off_data_evasion.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_state import load_pipeline_state  # noqa: E402  sibling module: scripts run as python benchmarks/<name>.py
from securemark.attacks import create_attack  # noqa: E402
from securemark.attacks.base import working_copy  # noqa: E402
from securemark.evaluation.grid import draw_coalitions  # noqa: E402
from securemark.model import accuracy, unit_index, unit_inputs, units  # noqa: E402
from securemark.tracing import codebook_indices, decide_readings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "off_data_evasion.json"


@torch.no_grad()
def swap_blind_spot(model, images: torch.Tensor, directions: int, scale: float, generator: torch.Generator):
    """Replace ``server.dense1``'s weight component in the ``directions`` input directions
    ``images`` excite least by Gaussian noise of ``scale`` x that component's norm."""
    index = unit_index(model, "server.dense1")
    block = units(model)[index][1]
    rows = unit_inputs(model, index, images).to(torch.float64)
    centred = rows - rows.mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred / len(rows))
    weak = vectors[:, :directions]
    weight = block.layer.weight.detach().to(torch.float64)
    part = weight @ weak @ weak.T
    noise = torch.randn(weight.shape[0], weak.shape[1], generator=generator, dtype=torch.float64) @ weak.T
    noise *= scale * part.norm() / noise.norm().clamp_min(1e-30)
    block.layer.weight.copy_((weight - part + noise).to(block.layer.weight.dtype))
    shift = (noise - part) @ rows.mean(0)  # what the swap adds on the attacker's data on average: cancelled, as obfuscate does
    bn = getattr(block, "bn", None)
    if bn is not None:
        bn.running_mean.add_(shift.to(bn.running_mean.dtype))
    elif block.layer.bias is not None:
        block.layer.bias.sub_(shift.to(block.layer.bias.dtype))
    return model


def main() -> None:
    state = load_pipeline_state()
    settings, vendor, extractor = state.settings, state.vendor, state.extractor
    issued, copies, data, test = state.issued, state.copies, state.data, state.test
    indices = codebook_indices(vendor.codebook)
    rng = np.random.default_rng(9)
    rows = []
    for size in (8,):
        for trial, coalition in enumerate(draw_coalitions(rng, sorted(copies), size, 2)):
            tuned = create_attack("compose", steps=[{"attack": "average"}, {"attack": "fine_tune", "epochs": 1}])(
                [copies[c] for c in coalition], data, torch.Generator().manual_seed(trial))
            for directions in (392, 1500, 2000, 2500, 3000):
                for scale in (1.0, 1.5):
                    model = swap_blind_spot(working_copy(tuned).eval(),
                                            data.images[:2500], directions, scale, torch.Generator().manual_seed(trial))
                    aligned, _ = extractor.aligned(model)
                    verdict = decide_readings(extractor.readings(aligned), vendor.codebook, indices, settings.trace.epsilon,
                                              settings.trace.scorer, settings.trace.decoder)
                    guilty = {issued[c] for c in coalition}
                    accused = {a.codeword_index for a in verdict.accused}
                    row = {"coalition_size": size, "trial": trial, "directions": directions, "scale": scale, "accuracy": accuracy(model, *test),
                           "caught": len(accused & guilty), "innocents_accused": len(accused - guilty),
                           "off_data_ratio": extractor.off_data_ratio(aligned), "readout_change": extractor.readout_change(aligned),
                           "flagged": extractor.obfuscated(aligned)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    RESULTS.write_text(json.dumps({"attack": "average 8 > fine_tune 1 > swap the blind-spot component of server.dense1 for noise", "rows": rows}, indent=1))
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
