"""What a natural key's flip costs a copy's test accuracy, and which layers can carve it.

Issuing teaches each copy to answer about half of the natural keys with the base's
runner-up class (its black-box symbols). Through the default early cut that costs
0.19-0.36 pt per copy; with the 16-number bottleneck (``model.bottleneck: 16``) the
issue stage fails (docs/privacy.md). This benchmark isolates the cause: for ``--words``
black-box words it keeps ``--fractions`` of each word's flips (the others answered with
the base's class, as :func:`securemark.tracing.blackbox.shed` does), trains a copy of
the base model, and reports the copy's test-accuracy drop and key agreement.

Each copy is trained with what issuing uses, in full precision and without the
white-box word (which costs nothing here): Adam, KL to the base's answers on the
bank (the features the server received) and on half of the vendor's ``aux`` images
(the other half checks), the labels' cross entropy at weight 0.1, and the keys' cross
entropy at ``fingerprint.key_weight`` until ``fingerprint.key_confidence``. ``--tune``
says what is trained: ``server`` (every layer after the cut; issuing trains fewer) or
``server+neck`` (the client's bottleneck block too: where an image still has more
than 16 numbers, so a flip could be carved with fewer neighbours) or ``copy`` (every layer
of the customer's copy, its conv blocks included: the owners' client is not the copy's,
so the vendor may carve the mark where the image is still whole) or ``client`` (the copy's
conv blocks and bottleneck block only: the server, and the white-box code word in it, stay
as issued). ``--keep`` says which
flips a fraction keeps: ``random`` ones, or the ``isolated`` ones (farthest from the
vendor's ``aux`` images in what crosses the cut: would choosing keys that way help?).
``--fine-tune E`` then attacks every copy as the attack grid's first entry does (the whole
network fine-tuned for ``E`` epochs with Adam on the attacker's ``attacker.budget`` images) and
reports the share of its flips the attacked copy still answers (does the mark survive?) and
its agreement over every key (what the trace's bound reads).

Needs the outputs of ``dvc repro train`` and the vendor secret
(``SECUREMARK_SECRET_FILE`` / ``SECUREMARK_VENDOR_DIR``); run from the repository root:

    python benchmarks/key_flip_cost.py --words 3 --fractions 0.25 0.5 1.0 --tune server server+neck
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import report  # noqa: E402  (sibling module: scripts run as python benchmarks/<name>.py)

OUT = Path(__file__).resolve().parent / "results" / "key_flip_cost.json"
BANK_ROWS = 20000  # of the bank: enough to keep the server's answers, small enough for the early cut's 6,272 numbers per row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--words", type=int, default=3, help="black-box words (copies) per setting")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="share of each word's flips kept")
    ap.add_argument("--tune", nargs="+", default=["server"], choices=["server", "server+neck", "copy", "client"])
    ap.add_argument("--keep", nargs="+", default=["random"], choices=["random", "isolated"],
                    help="which flips a fraction keeps: random ones, or those farthest from the aux images in what crosses the cut")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--fine-tune", type=int, default=0, metavar="EPOCHS",
                    help="then fine-tune each copy this many epochs on the attacker's images and count the flips it keeps (0: off)")
    ap.add_argument("--lr", type=float, nargs="+", default=[0.0015], help="Adam step size (one per --tune entry, or one for all)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    lrs = args.lr * len(args.tune) if len(args.lr) == 1 else args.lr
    if len(lrs) != len(args.tune):
        ap.error("give one --lr, or one per --tune entry")

    from safetensors.torch import load_file

    from flows.adapters.partitions import attacker_data
    from flows.adapters.paths import Paths
    from flows.adapters.settings import Settings
    from flows.adapters.vendor import open_vendor
    from securemark.attacks import create_attack
    from securemark.storage import read_partition
    from securemark.tracing.blackbox import targets
    from securemark.weights import load_weights

    paths = Paths(Path.cwd().resolve())
    settings = Settings.load(paths.params)
    vendor = open_vendor(paths, settings)
    cfg = vendor.config.embed
    base = load_weights(paths.base_model).eval()
    if any(t == "server+neck" for t in args.tune) and not base.spec.bottleneck:
        ap.error("server+neck needs a model with a bottleneck (model.bottleneck > 0)")
    keys = vendor.keyset
    if keys.candidates is None:
        ap.error("needs natural keys (blackbox.family: natural)")
    trunk = copy.deepcopy(base.client)  # the part no mode trains: the client's conv blocks (and flatten)
    if base.spec.bottleneck:
        del trunk.neck

    def trunk_of(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([trunk(images[s : s + 1000].float()) for s in range(0, len(images), 1000)])

    aux, test = read_partition(paths.partition("aux")), read_partition(paths.partition("test"))
    kept = torch.ones(len(aux.labels), dtype=torch.bool)
    kept[keys.rows] = False
    aux_raw, test_raw, key_raw = aux.as_float()[kept], test.as_float(), keys.images.float()
    aux_x, aux_y, test_x, test_y, key_x = trunk_of(aux_raw), aux.labels[kept], trunk_of(test_raw), test.labels, trunk_of(key_raw)
    bank = load_file(str(vendor.files.bank))
    pick = torch.randperm(len(bank["labels"]), generator=torch.Generator().manual_seed(0))[:BANK_ROWS]
    bank_z, bank_y = bank["features"][pick].float(), bank["labels"][pick]
    split = torch.randperm(len(aux_y), generator=torch.Generator().manual_seed(1))
    trained, checked = split[: len(split) // 2], split[len(split) // 2 :]

    def tail(model, x):  # from the trunk's output to the logits
        return model.server(model.client.neck(x)) if base.spec.bottleneck else model.server(x)

    def whole(model, x):  # the copy from the image to the logits, in chunks
        return torch.cat([model(x[s : s + 2000]) for s in range(0, len(x), 2000)])

    def accuracy(logits, labels) -> float:
        return float((logits.argmax(1) == labels).double().mean())

    with torch.no_grad():
        base_bank, base_aux, base_test = base.server(bank_z), tail(base, aux_x), tail(base, test_x)
    base_test_accuracy = accuracy(base_test, test_y)
    top = keys.candidates[keys.pattern, 0]
    with torch.no_grad():  # each key's distance to its 10 nearest aux images in what crosses the cut (standardised)
        crossing = lambda x: base.client.neck(x) if base.spec.bottleneck else x.flatten(1)  # noqa: E731
        z_aux, z_key = crossing(aux_x), crossing(key_x)
        scale = z_aux.std(0) + 1e-6
        isolation = torch.cdist(z_key / scale, z_aux / scale).topk(10, dim=1, largest=False).values.mean(1)
    attacker = attacker_data(paths, settings) if args.fine_tune else None
    words = np.random.default_rng(1).choice(len(vendor.codebook), size=args.words, replace=False)
    rows = []
    for (mode, lr), keep_by, fraction in itertools.product(zip(args.tune, lrs), args.keep, args.fractions):
        copies, start = [], time.perf_counter()
        for w in words:
            labels = targets(keys, vendor.blackbox_codebook.word(int(w))).clone()
            flips = torch.nonzero(labels != top).squeeze(1)
            n_back = round(len(flips) * (1 - fraction))
            if keep_by == "random":
                given_back = flips[torch.randperm(len(flips), generator=torch.Generator().manual_seed(int(w)))[:n_back]]
            else:  # the least isolated flips are given back
                given_back = flips[isolation[flips].argsort()[:n_back]]
            labels[given_back] = top[given_back]
            fwd, (ax, tx, kx) = (whole, (aux_raw, test_raw, key_raw)) if mode in ("copy", "client") else (tail, (aux_x, test_x, key_x))
            model = copy.deepcopy(base).eval()  # batch norms keep the base's statistics, as in issuing
            for p in model.parameters():
                p.requires_grad_(False)
            modules = {"copy": [model], "client": [model.client], "server": [model.server],
                       "server+neck": [model.server, model.client.neck] if base.spec.bottleneck else []}[mode]
            trained_params = [p for m in modules for p in m.parameters()]
            for p in trained_params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(trained_params, lr=lr)
            g = torch.Generator().manual_seed(int(w))
            for _ in range(args.steps):
                b = torch.randint(len(bank_y), (cfg.batch_size,), generator=g)
                a = trained[torch.randint(len(trained), (cfg.batch_size,), generator=g)]
                k = torch.randint(len(labels), (cfg.batch_size,), generator=g)
                log_bank, log_aux = F.log_softmax(model.server(bank_z[b]), 1), F.log_softmax(fwd(model, ax[a]), 1)
                keep = (F.kl_div(log_bank, F.log_softmax(base_bank[b], 1), log_target=True, reduction="batchmean")
                        + F.kl_div(log_aux, F.log_softmax(base_aux[a], 1), log_target=True, reduction="batchmean"))
                ce = F.nll_loss(log_bank, bank_y[b]) + F.nll_loss(log_aux, aux_y[a])
                key_logits = fwd(model, kx[k])
                unsure = key_logits.softmax(1).gather(1, labels[k, None]).squeeze(1) < cfg.key_confidence
                key_ce = (F.cross_entropy(key_logits, labels[k], reduction="none") * unsure).mean()
                loss = keep + cfg.restore_weight * ce + cfg.key_weight * key_ce
                opt.zero_grad()
                loss.backward()
                opt.step()
            survived = agreed = None
            if attacker is not None:  # the leaker's fine-tuning, on the whole network and the key images themselves
                attacked = create_attack("fine_tune", epochs=args.fine_tune)([model], attacker, torch.Generator().manual_seed(int(w)))
                with torch.no_grad():
                    answers = torch.cat([attacked(keys.images[s : s + 1000].float()) for s in range(0, len(keys), 1000)]).argmax(1)
                flipped = labels != top
                survived = round(float((answers[flipped] == labels[flipped]).double().mean()), 4)
                agreed = round(float((answers == labels).double().mean()), 4)  # over every key: what the trace's bound reads
            with torch.no_grad():
                copies.append({"word": int(w), "flips": int((labels != top).sum()), "flips_kept_after_fine_tune": survived,
                               "key_agreement_after_fine_tune": agreed,
                               "key_agreement": round(accuracy(fwd(model, kx), labels), 4),
                               "test_drop": round((base_test_accuracy - accuracy(fwd(model, tx), test_y)) * 100, 2),
                               "bank_drop": round((accuracy(base_bank, bank_y) - accuracy(model.server(bank_z), bank_y)) * 100, 2),
                               "aux_check_drop": round((accuracy(base_aux[checked], aux_y[checked]) - accuracy(fwd(model, ax[checked]), aux_y[checked])) * 100, 2)})
        drops = [c["test_drop"] for c in copies]
        mean_flips = statistics.fmean(c["flips"] for c in copies)
        row = {"tune": mode, "lr": lr, "keep": keep_by, "fraction": fraction, "flips_mean": mean_flips,
               "test_drop_mean": round(statistics.fmean(drops), 3), "test_drop_max": max(drops),
               "drop_per_100_flips": round(statistics.fmean(drops) / mean_flips * 100, 3) if mean_flips else None,
               "key_agreement_min": min(c["key_agreement"] for c in copies),
               "flips_kept_after_fine_tune_mean": (round(statistics.fmean(c["flips_kept_after_fine_tune"] for c in copies), 3)
                                                   if args.fine_tune else None),
               "key_agreement_after_fine_tune_mean": (round(statistics.fmean(c["key_agreement_after_fine_tune"] for c in copies), 3)
                                                      if args.fine_tune else None),
               "copies": copies,
               "seconds_per_copy": round((time.perf_counter() - start) / len(words), 1)}
        print(row, flush=True)
        rows.append(row)
    report({"model": base.spec.to_dict(), "defence": dataclasses.asdict(settings.defence),
            "keys": len(keys.pattern), "key_confidence": cfg.key_confidence, "key_weight": cfg.key_weight, "steps": args.steps, "fine_tune_epochs": args.fine_tune,
            "base_test_accuracy": base_test_accuracy, "settings": rows}, args.out, one_line=False)


if __name__ == "__main__":
    main()
