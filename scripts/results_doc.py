"""The stage-metrics part of ``docs/results.md``, generated from ``metrics/`` so it cannot drift.

``docs/results.md`` holds, between the markers below, the tables this script renders from
the committed DVC metrics (what the last ``dvc repro`` measured); the benchmark tables
after it are written by hand beside the command that produced each. After a ``dvc repro``:

    python scripts/results_doc.py          # rewrite the generated block in docs/results.md
    python scripts/results_doc.py --check  # exit 1 if the block differs (tests/unit/test_docs.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attack_table import table as attack_table  # noqa: E402

BEGIN = "<!-- begin generated: python scripts/results_doc.py (from metrics/) -->"
END = "<!-- end generated -->"
DOC = ROOT / "docs" / "results.md"


def _load(metrics: Path, name: str) -> dict:
    return json.loads((metrics / f"{name}.json").read_text())


def _pt(x: float) -> str:
    return f"{x:.2f} pt"


def render(metrics: Path) -> str:
    """The generated block (markdown) for the metrics in ``metrics``."""
    fp, tr, bb = _load(metrics, "fingerprint"), _load(metrics, "trace"), _load(metrics, "blackbox")
    pv, train, und, att = _load(metrics, "privacy"), _load(metrics, "train"), _load(metrics, "train_undefended"), _load(metrics, "attacks")
    alone = _load(metrics, "attacker_baseline")
    rows = [
        ("base model test accuracy: defended / undefended", f"{100 * train['test_accuracy']:.2f} % / {100 * und['test_accuracy']:.2f} %", "train"),
        ("attacker alone (the vendor's recipe on its own images): accuracy by budget",
         ", ".join(f"{r['budget']}: {100 * r['accuracy']:.2f} %" for r in alone), "attacker_baseline"),
        ("copies issued (weight word of {} bits + black-box word): BER max / min margin".format(fp["code_length"]),
         f"{fp['copies']} copies, BER {fp['ber_max']:.3f}, margin {fp['margin_min']:.3f}", "fingerprint"),
        ("accuracy drop of the copies vs the base (test set): max / mean", f"{_pt(fp['accuracy_drop_max'])} / {_pt(fp['accuracy_drop_mean'])}",
         "fingerprint"),
        ("keys answered with the customer's black-box symbols, min over copies", f"{100 * fp['key_agreement_min']:.1f} %", "fingerprint"),
        ("seconds per copy: embedding / with registration; set-up", f"{fp['seconds_per_copy']:.2f} s / {fp['seconds_per_copy_with_registration']:.2f} s; "
         f"{fp['setup_seconds']:.0f} s", "fingerprint"),
        ("copies traced through their weights to exactly their customer", f"{tr['copies_correct']} / {tr['copies_traced']}", "trace"),
        ("null models: accusations / models (innocent scores; against independently trained models)",
         f"{tr['null_accusations']} / {tr['null_models']} ({tr['null_scores']:,}; {tr['null_scores_independent']:,}), "
         f"max {tr['max_null_score_ratio']:.2f} x threshold", "trace"),
        ("copies traced through their APIs (queries, mean / max)", f"{bb['copies_correct']} / {bb['copies']} ({bb['queries_mean']:.0f} / {bb['queries_max']})",
         "blackbox"),
        ("null APIs: accusations / APIs", f"{bb['null_accusations']} / {bb['null_apis']}, max {bb['max_null_score_ratio']:.2f} x threshold", "blackbox"),
        ("accuracy cost of the black-box marks: max / mean", f"{_pt(bb['accuracy_cost_max'])} / {_pt(bb['accuracy_cost_mean'])}", "blackbox"),
        ("hard-label distillation through the API: traced / trials (key agreement; chance: 0.50 for natural keys, 0.10 for patterns)",
         f"{bb['distillation_traced']} / {bb['distillation_trials']} ({bb['distillation_key_agreement_mean']:.2f})", "blackbox"),
        ("query filters refusing 5 % of own images: traced / trials (keys refused, min-max)",
         f"{bb['filter_traced']} / {bb['filter_trials']} ({100 * bb['filter_refused_keys_min']:.0f}-{100 * bb['filter_refused_keys_max']:.0f} %)", "blackbox"),
    ]
    for variant in ("defended", "undefended"):
        v = pv[variant]
        ssims = ", ".join(f"{name} {a['ssim']:.3f}" for name, a in v["attackers"].items())
        bound = v.get("mse_lower_bound")
        certified = f"; certified MSE >= {bound:.3f} (dFIL)" if bound else "; nothing certified (no noise)"
        rows.append((f"privacy audit ({pv.get('zoo', 'budgeted')} zoo), {variant}: leakage beyond labels (strongest: {v['strongest']}); SSIM per attacker",
                     f"{v['leakage']:.3f}; {ssims}{certified}", "privacy"))
    rows.append(("attack grid: attacked models, innocents accused", f"{att['attacked_models']}, {att['innocents_accused_total']}", "attacks"))
    lines = [BEGIN, "", "| what | value | `metrics/` |", "|---|---|---|"]
    lines += [f"| {what} | {value} | `{name}.json` |" for what, value, name in rows]
    lines += ["", f"The attack grid (`metrics/attacks.csv`, {att['attacked_models']} attacked models; `python benchmarks/attack_table.py`):", "",
              attack_table(pd.read_csv(metrics / "attacks.csv")), "", END]
    return "\n".join(lines)


def rewrite(doc: str, block: str) -> str:
    """``doc`` with its generated block replaced by ``block``."""
    start, end = doc.index(BEGIN), doc.index(END) + len(END)
    return doc[:start] + block + doc[end:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", type=Path, default=ROOT / "metrics")
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/results.md's generated block is not what metrics/ gives")
    args = ap.parse_args()
    doc = DOC.read_text()
    updated = rewrite(doc, render(args.metrics))
    if args.check:
        if updated != doc:
            sys.exit("docs/results.md is out of date with metrics/: run `python scripts/results_doc.py`")
        return
    DOC.write_text(updated)
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
