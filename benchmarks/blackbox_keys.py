"""Black-box keys: what teaching them costs, natural against blended keys.

Embeds one copy of the pipeline's base model per (key design, seed) with the issue
stage's settings, changing only the key design, and reports the test-accuracy drop,
the steps, the seconds and the fraction of keys the copy answers with its word. Needs
the outputs of ``dvc repro train`` (base model, feature bank, partitions); run from the
repository root:

    python benchmarks/blackbox_keys.py                         # the README table
    python benchmarks/blackbox_keys.py --designs 128:0.4:0.3 --seeds 0 1 2

A design is ``keys:blend:key_weight`` (blend 0: natural ``aux`` keys).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.vendor import probe_images
from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.blackbox import agreement, key_views, select_keys, targets
from securemark.fingerprint import EmbeddingFailed, KeyTargets, Readout, carrier_inputs, embed
from securemark.key import projection, random_secret
from securemark.model import accuracy
from securemark.storage import read_partition
from securemark.weights import load_weights

OUT = Path(__file__).resolve().parent / "results" / "blackbox_keys.json"
DESIGNS = ["128:0:0.3", "256:0.4:0.3", "128:0.4:1.0", "128:0.4:0.3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--designs", nargs="+", default=DESIGNS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(2)
    paths = Paths.from_env()
    settings = Settings.load(paths.params)
    base = load_weights(paths.base_model)
    bank = load_file(str(paths.bank("defended")))
    cfg0 = dataclasses.replace(settings.fingerprint.embed, max_steps=args.max_steps)
    pick = torch.randperm(len(bank["labels"]), generator=torch.Generator().manual_seed(0))[: cfg0.eval_rows + cfg0.train_rows]
    inputs, labels = carrier_inputs(base, cfg0.layer, bank["features"][pick]), bank["labels"][pick]
    test_part = read_partition(paths.partition("test"))
    test = (test_part.as_float(), test_part.labels)
    aux = read_partition(paths.partition("aux")).as_float()
    readout = Readout.build(cfg0.readout, base, cfg0.layer, probe_images(paths, settings), cfg0.rank)
    code_length = settings.fingerprint.code.options["code_length"]
    K = projection(random_secret(), readout.layer, code_length, readout.features(base).numel())
    base_accuracy = accuracy(base, *test)
    rows = []
    for design in args.designs:
        n, blend, weight = design.split(":")
        for seed in args.seeds:
            keys = select_keys(base, aux, int(n), 7 + seed, settings.blackbox.pool_factor, float(blend))
            key_inputs, key_index, original = key_views(base, cfg0.layer, keys, settings.blackbox.views, 3)
            word = np.random.default_rng(100 + seed).integers(0, 2, int(n))
            bits = np.random.default_rng(seed).integers(0, 2, code_length).astype(np.uint8)
            cfg = dataclasses.replace(cfg0, key_weight=float(weight))
            start = time.perf_counter()
            try:
                result = embed(base, bits, K, readout, inputs, labels, cfg, torch.Generator().manual_seed(seed),
                               KeyTargets(key_inputs, targets(keys, word)[key_index], original))
                model, steps, ok = result.model, result.steps, True
            except EmbeddingFailed as exc:
                model, steps, ok = exc.model, exc.steps, False
            row = {"keys": int(n), "blend": float(blend), "key_weight": float(weight), "seed": seed, "embedded": ok, "steps": steps,
                   "seconds": round(time.perf_counter() - start, 1),
                   "test_drop_points": round((base_accuracy - accuracy(model, *test)) * 100, 2),
                   "key_agreement": agreement(keys, word, model.eval()(keys.images).argmax(1))}
            print(row, flush=True)
            rows.append(row)
    report(rows, args.out)


if __name__ == "__main__":
    main()
