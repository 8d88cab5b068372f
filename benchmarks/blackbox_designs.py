"""Black-box key designs against the attacker who has read the design.

Embeds copies of the pipeline's base model with the issue stage's settings, changing
only how the black-box word is carried, and attacks each copy with what removes a word
without seeing a key: fine-tuning, invariance training against the published key family
(random block patterns, mixup), purifiers fitted on the attacker's images, query filters
and distillation through the API. For every attacked copy it reports the accuracy, the
share of keys answered with the copy's symbols, and whether the API trace would accuse
the leaker: the score of its word against the Chernoff threshold of the real bound
(:func:`securemark.tracing.blackbox.threshold`) for ``--customers`` words at the
stage's epsilon, split over the sequential checkpoints, on a read of every key.

Designs (``family:args@key_weight/key_confidence``):

- ``patterns:M:R:BLEND:CELLS``: today's keys, ``M`` secret block patterns each blended
  into ``R`` aux images, one of 10 classes per pattern and customer;
- ``points:M``: the ``M`` aux images the base model is least sure of (runner-up
  probability over top probability, largest first), each its own binary symbol: the copy
  answers the base's top class or its runner-up;
- ``regions:R:RATIO``: the aux images with that ratio at least ``RATIO`` grouped into
  ``R`` regions (k-means on what the carrying block reads, each region kept to its most
  common class pair); one binary symbol per region, taught to all its images (a bias of
  the boundary a student trained on natural images may inherit).

Needs the outputs of ``dvc repro train`` (base model, feature bank, partitions); run
from the repository root:

    python benchmarks/blackbox_designs.py
    python benchmarks/blackbox_designs.py --designs points:256@0.5/0.6 --seeds 1 2 --attacks fine_tune_adam distill_hard
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
from securemark.fingerprint import EmbeddingFailed, KeyTargets, carrier_inputs, embed
from securemark.model import accuracy, predict
from securemark.tracing.blackbox import KeySet, key_views, make_keys, threshold

OUT = Path(__file__).resolve().parent / "results" / "blackbox_designs.json"
DESIGNS = ["patterns:64:8:0.4:7@0.5/0.9", "points:256@0.5/0.9", "points:512@0.5/0.75", "regions:128:0.5@0.5/0.6"]
ATTACKS = {
    "none": None,
    "fine_tune_adam": ("fine_tune", dict(epochs=5, optimizer="adam", lr=1e-3)),
    "fine_tune_sgd": ("fine_tune", dict(epochs=5, optimizer="sgd", lr=1e-2)),
    "invariance_blocks": ("invariance", dict(family="blocks", epochs=3)),
    "invariance_mixup": ("invariance", dict(family="mixup", epochs=3)),
    "purify_pca128": ("purify", dict(method="pca", components=128, adapt_epochs=3)),
    "purify_denoiser": ("purify", dict(method="denoiser", epochs=10, adapt_epochs=3)),
    "filter_softmax": ("query_filter", dict(detector="softmax", fallback="second")),
    "filter_distance": ("query_filter", dict(detector="distance", fallback="second")),
    "distill_hard": ("distill", dict(labels="hard")),
    "distill_soft": ("distill", dict(labels="soft")),
}


@dataclasses.dataclass(frozen=True)
class Design:
    """Keys, the classes each group of keys may be answered with, and the embedding weights."""

    keys: KeySet                # pattern = the symbol (group) each key belongs to
    candidates: torch.Tensor    # int64 [groups, q']: the classes a group's symbol stands for
    key_weight: float
    key_confidence: float


def build_design(spec: str, base, aux: torch.Tensor, layer: str) -> Design:
    body, _, weights = spec.partition("@")
    weight, confidence = (float(v) for v in (weights or "0.5/0.9").split("/"))
    family, *args = body.split(":")
    with torch.no_grad():
        probs = predict_probs(base, aux)
    top = probs.topk(2, 1)
    ratio = top.values[:, 1] / top.values[:, 0]
    if family == "patterns":
        m, r, blend, cells = int(args[0]), int(args[1]), float(args[2]), int(args[3])
        keys = make_keys(aux, m, r, 11, blend, cells)
        return Design(keys, torch.arange(10).repeat(m, 1), weight, confidence)
    if family == "points":
        rows = ratio.argsort(descending=True)[: int(args[0])]
        keys = KeySet(aux[rows].contiguous(), torch.arange(len(rows)), rows, len(rows))
        return Design(keys, top.indices[rows], weight, confidence)
    if family == "regions":
        from sklearn.cluster import KMeans

        count, least = int(args[0]), float(args[1])
        ambiguous = torch.nonzero(ratio >= least).squeeze(1)
        with torch.no_grad():
            reads = carrier_inputs(base, layer, base.eval().client(aux[ambiguous]))
        cluster = KMeans(count, n_init=4, random_state=0).fit_predict(reads.numpy())
        pairs = top.indices[ambiguous].sort(1).values
        rows, group, candidates = [], [], []
        for c in range(count):
            members = np.nonzero(cluster == c)[0]
            if len(members) == 0:
                continue
            kinds, counts = torch.unique(pairs[members], dim=0, return_counts=True)
            pair = kinds[counts.argmax()]
            kept = [i for i in members if bool((pairs[i] == pair).all())]
            rows += kept
            group += [len(candidates)] * len(kept)
            candidates.append(pair)
        rows = ambiguous[torch.tensor(rows)]
        keys = KeySet(aux[rows].contiguous(), torch.tensor(group), rows, len(candidates))
        return Design(keys, torch.stack(candidates), weight, confidence)
    raise SystemExit(f"unknown design family {family!r} in {spec!r} (patterns | points | regions)")


@torch.no_grad()
def predict_probs(model, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.eval()(images[i : i + 2048]).softmax(1) for i in range(0, len(images), 2048)])


def symbol_profile(design: Design, answers: torch.Tensor) -> np.ndarray:
    """``P[g, j]``: the share of group ``g``'s keys answered with its candidate class ``j``."""
    groups = design.keys.pattern
    hits = (answers[:, None] == design.candidates[groups]).double()  # [n, q']
    total = torch.zeros(design.candidates.shape, dtype=torch.float64).index_add_(0, groups, hits)
    asked = torch.bincount(groups, minlength=len(design.candidates)).double().clamp_min(1)
    return (total / asked[:, None]).numpy()


def verdict(design: Design, symbols: np.ndarray, answers: torch.Tensor, delta: float) -> tuple[float, bool]:
    """The leaker's score over the threshold an innocent word exceeds with probability
    at most ``delta``, and whether it is accused."""
    P = symbol_profile(design, answers)
    score = float(P[np.arange(len(symbols)), symbols].sum())
    limit = threshold(P, delta)
    return round(score / limit, 3), score >= limit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--designs", nargs="+", default=DESIGNS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--customers", type=int, default=10_000, help="words the bound is union-bounded over")
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(2)
    scratch = scratch_setup(args.max_steps)
    settings, base, cfg0, inputs, labels = scratch.settings, scratch.base, scratch.cfg, scratch.inputs, scratch.labels
    test, aux, data, readout, K = scratch.test, scratch.aux, scratch.data, scratch.readout, scratch.key_matrix
    code_length, base_accuracy = scratch.code_length, scratch.base_accuracy
    delta = settings.trace.epsilon / len(settings.blackbox.checkpoints) / args.customers
    rows = []
    for spec in args.designs:
        design = build_design(spec, base, aux, cfg0.layer)
        key_inputs, key_index, original = key_views(base, cfg0.layer, design.keys, 1, 3)
        cfg = dataclasses.replace(cfg0, key_weight=design.key_weight, key_confidence=design.key_confidence)
        print(f"{spec}: {len(design.keys)} keys in {len(design.candidates)} symbols of {design.candidates.shape[1]} classes", flush=True)
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            symbols = rng.integers(0, design.candidates.shape[1], len(design.candidates))
            targets = design.candidates[torch.arange(len(symbols)), torch.from_numpy(symbols)][design.keys.pattern]
            bits = rng.integers(0, 2, code_length).astype(np.uint8)
            start = time.perf_counter()
            try:
                model = embed(base, bits, K, readout, inputs, labels, cfg, torch.Generator().manual_seed(seed),
                              KeyTargets(key_inputs, targets[key_index], original)).model
                embedded = True
            except EmbeddingFailed as exc:
                model, embedded = exc.model, False
            row = {"design": spec, "seed": seed, "keys": len(design.keys), "symbols": len(design.candidates), "embedded": embedded,
                   "seconds": round(time.perf_counter() - start, 1), "test_drop_points": round((base_accuracy - accuracy(model, *test)) * 100, 2)}
            for name in args.attacks:
                attacked = model
                if ATTACKS[name] is not None:
                    kind, options = ATTACKS[name]
                    attacked = create_attack(kind, **options).apply([model], data, torch.Generator().manual_seed(5))
                answers = predict(attacked, design.keys.images)
                ratio, accused = verdict(design, symbols, answers, delta)
                row[name] = {"accuracy": round(accuracy(attacked, *test) * 100, 2),
                             "agreement": round(float((answers == targets).double().mean()), 3), "score_over_threshold": ratio, "traced": accused}
            print(row, flush=True)
            rows.append(row)
    report(rows, args.out, one_line=False)


if __name__ == "__main__":
    main()
