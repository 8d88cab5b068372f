"""Black-box keys: what teaching them costs and what survives the attacker's fine-tuning.

Embeds copies of the pipeline's base model with the issue stage's settings, changing
only the key design, and reports per copy: the steps and seconds, the test-accuracy
drop against the base, the share of the keys answered with the copy's symbols, the same
on *fresh* images carrying the same patterns (did the copy learn a rule or memorise
points?), and the share left after the attacker's fine-tuning (5 epochs of Adam 1e-3
and of SGD 1e-2 on its 2,500 images), with the attacked model's accuracy. Needs the
outputs of ``dvc repro train`` (base model, feature bank, partitions); run from the
repository root:

    python benchmarks/blackbox_keys.py                          # the README table
    python benchmarks/blackbox_keys.py --designs 64:8:0.4:7:0.5:0.9 --seeds 1 2 3

A design is ``patterns:per_pattern:blend:cells:key_weight:key_confidence[:lr]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from embedding_setup import scratch_setup  # sibling module: scripts run as python benchmarks/<name>.py
from results_io import report
from securemark.attacks import create_attack
from securemark.tracing.blackbox import SymbolBook, agreement, key_views, make_keys, targets
from securemark.fingerprint import EmbeddingFailed, KeyTargets, embed
from securemark.model import accuracy

OUT = Path(__file__).resolve().parent / "results" / "blackbox_keys.json"
DESIGNS = ["64:8:0.4:7:0.5:0.9", "64:8:0.4:7:1.0:0.95", "128:4:0.4:7:1.0:0.9", "128:2:0.4:7:0.3:0.8"]
ATTACKS = {"fine_tune_adam": dict(epochs=5, optimizer="adam", lr=1e-3), "fine_tune_sgd": dict(epochs=5, optimizer="sgd", lr=1e-2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--designs", nargs="+", default=DESIGNS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(2)
    scratch = scratch_setup(args.max_steps)
    base, cfg0, inputs, labels = scratch.base, scratch.cfg, scratch.inputs, scratch.labels
    test, aux, data, readout, K = scratch.test, scratch.aux, scratch.data, scratch.readout, scratch.key_matrix
    code_length, base_accuracy = scratch.code_length, scratch.base_accuracy
    rows = []
    for design in args.designs:
        m, r, blend, cells, weight, confidence, *lr = design.split(":")
        keys = make_keys(aux, int(m), int(r), 11, float(blend), int(cells))
        fresh = make_keys(aux, int(m), int(r), 11, float(blend), int(cells), image_seed=99)  # same patterns, other images
        key_inputs, key_index, original = key_views(base, cfg0.layer, keys, 1, 3)
        cfg = dataclasses.replace(cfg0, key_weight=float(weight), key_confidence=float(confidence), lr=float(lr[0]) if lr else cfg0.lr)
        book = SymbolBook.generate(max(args.seeds) + 1, int(m), seed=100)
        for seed in args.seeds:
            word = book.word(seed)
            bits = np.random.default_rng(seed).integers(0, 2, code_length).astype(np.uint8)
            start = time.perf_counter()
            try:
                result = embed(base, bits, K, readout, inputs, labels, cfg, torch.Generator().manual_seed(seed),
                               KeyTargets(key_inputs, targets(keys, word)[key_index], original))
                model, steps, ok = result.model, result.steps, True
            except EmbeddingFailed as exc:
                model, steps, ok = exc.model, exc.steps, False
            row = {"design": design, "seed": seed, "embedded": ok, "steps": steps, "seconds": round(time.perf_counter() - start, 1),
                   "test_drop_points": round((base_accuracy - accuracy(model, *test)) * 100, 2),
                   "key_agreement": _agree(model, keys, word), "fresh_agreement": _agree(model, fresh, word)}
            for name, options in ATTACKS.items():
                attacked = create_attack("fine_tune", **options).apply([model], data, torch.Generator().manual_seed(5))
                row[name] = _agree(attacked, keys, word)
                row[name + "_accuracy"] = round(accuracy(attacked, *test) * 100, 2)
            print(row, flush=True)
            rows.append(row)
    report(rows, args.out)


@torch.no_grad()
def _agree(model, keys, word) -> float:
    return round(agreement(keys, word, model.eval()(keys.images).argmax(1)), 3)


if __name__ == "__main__":
    main()
