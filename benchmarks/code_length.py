"""Code length on real copies: embedding time, accuracy cost, and colluders caught by
coalition size, for averaging and for averaging followed by fine-tuning.

For each code length, ``--copies`` copies of the pipeline's base model are issued with
the vendor's embedding (the params' fingerprint settings, a codebook of ``--customers``
words and a key drawn from a throwaway secret, so the vendor's real state is never
touched). Then, for each coalition size c, ``--trials`` random coalitions average their
copies (and, in the second variant, fine-tune the average for one epoch on the
attacker's images); every attacked model is traced with the pipeline's extractor and
decoder at the params' epsilon over all ``--customers`` words. Needs the pipeline's
artifacts (``make run``); run from the repository root:

    python benchmarks/code_length.py --lengths 304 512 1024 --sizes 1 2 4 8 16 --trials 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.attacks import AttackData, create_attack
from securemark.codes import create_code
from securemark.fingerprint import Readout, carrier_inputs, embed, tail_accuracy
from securemark.key import projection, random_secret
from securemark.model import accuracy, unit_index
from securemark.partition import stratified_subset
from securemark.storage import read_partition
from securemark.tracing import Extractor, codebook_indices, create_decoder
from securemark.weights import load_weights

OUT = Path(__file__).resolve().parent / "results" / "code_length.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[304, 512, 1024])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--customers", type=int, default=10_000)
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    paths = Paths(args.root.resolve())
    settings = Settings.load(paths.params)
    cfg, trace = settings.fingerprint.embed, settings.trace
    base = load_weights(paths.base_model)
    bank = load_file(str(paths.bank("defended")))
    inputs = carrier_inputs(base, cfg.layer, bank["features"])
    test_part = read_partition(paths.partition("test"))
    test = (test_part.as_float(), test_part.labels)
    attacker = read_partition(paths.partition("attacker"))
    index = torch.from_numpy(stratified_subset(attacker.labels.numpy(), settings.attacker.budget, settings.base.seed))
    data = AttackData(attacker.as_float()[index], attacker.labels[index])
    probe = read_partition(paths.partition("aux")).as_float()[: settings.trace.probe_size]
    readout = Readout.build(cfg.readout, base, cfg.layer, probe, cfg.rank)
    base_accuracy = accuracy(base, *test)
    # Copies (and averages of copies) differ from the base only from the carrying block on:
    # their test accuracy is computed from what that block reads (exact, and much faster).
    index = unit_index(base, cfg.layer.rsplit(".", 2)[0])
    with torch.no_grad():
        features = torch.cat([base.eval().client(test[0][i : i + 1000]) for i in range(0, len(test[1]), 1000)])
    test_tail = (carrier_inputs(base, cfg.layer, features), test[1])
    rng = np.random.default_rng(settings.base.seed)
    rows = []
    for m in args.lengths:
        codebook = create_code("random", code_length=m).generate(args.customers, seed=int(rng.integers(2**31)))
        key = projection(random_secret(), cfg.layer, m, readout.features(base).numel())
        extractor = Extractor(settings.model, readout, key, base, probe, trace.align)
        copies, seconds, drops = [], [], []
        for j in range(args.copies):
            start = time.perf_counter()
            result = embed(base, codebook.word(j), key, readout, inputs, bank["labels"], cfg, torch.Generator().manual_seed(j))
            seconds.append(time.perf_counter() - start)
            drops.append((base_accuracy - tail_accuracy(result.model, index, *test_tail)) * 100)
            copies.append(result.model)
        decide = create_decoder(trace.decoder)
        indices = codebook_indices(codebook)
        for variant in ("average", "average>fine_tune"):
            steps = [{"attack": "average"}] + ([{"attack": "fine_tune", "epochs": 1}] if variant != "average" else [])
            attack = create_attack("compose", steps=steps)
            for c in args.sizes:
                caught, any_caught, innocents, accs = [], 0, 0, []
                for trial in range(args.trials):
                    coalition = sorted(rng.choice(args.copies, size=c, replace=False).tolist())
                    attacked = attack([copies[i] for i in coalition], data, torch.Generator().manual_seed(trial))
                    y, _ = extractor(attacked)
                    verdict = decide(y, codebook, indices, trace.epsilon, trace.scorer)
                    accused = {a.codeword_index for a in verdict.accused}
                    caught.append(len(accused & set(coalition)))
                    any_caught += bool(accused & set(coalition))
                    innocents += len(accused - set(coalition))
                    accs.append(tail_accuracy(attacked, index, *test_tail) if variant == "average" else accuracy(attacked, *test))
                row = {"code_length": m, "attack": variant, "c": c, "trials": args.trials, "caught_mean": statistics.fmean(caught),
                       "all_caught_trials": sum(k == c for k in caught), "at_least_one_trials": any_caught,
                       "innocents_accused": innocents, "accuracy_mean": statistics.fmean(accs),
                       "embed_seconds_mean": statistics.fmean(seconds), "accuracy_drop_max_pt": max(drops),
                       "accuracy_drop_mean_pt": statistics.fmean(drops), "customers": args.customers, "epsilon": trace.epsilon}
                print(row, flush=True)
                rows.append(row)
    report(rows, args.out, one_line=False)


if __name__ == "__main__":
    main()
