"""What people read: trace reports (JSON and markdown), score plots, audit tables.

Pure rendering: each function turns results into a dict, a markdown string or a PNG
file; the flows decide where those go (MLflow, Prefect artifacts, the terminal).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from securemark.codes import Codebook
from securemark.key import FingerprintKey
from securemark.tracing.blackbox import BOUND_DESCRIPTION as API_BOUND_DESCRIPTION
from securemark.tracing import BOUND_DESCRIPTION, Verdict


UNASSIGNED = "(unassigned)"
INCONCLUSIVE_REASONS = {  # report["inconclusive_reason"] -> why a trace that accused no one concludes nothing
    "obfuscated": "the model was obfuscated where data does not look",
    "degenerate": "nothing could be read from the model",
    "under-powered": "the read was too short to accuse even an unmodified copy",
}


def verdict_report(verdict: Verdict, customers: dict[int, str], key: FingerprintKey, codebook: Codebook, model: str, sha: str,
                   alignment: dict | None = None, channel: str = "weights", queries: int | None = None) -> dict:
    """The JSON report of one trace. ``customers`` maps code-word indices to customer ids;
    a word not in it belongs to no one yet and is reported as unassigned (every word of
    the codebook is scored, so the bound covers every customer the ledger can hold)."""

    def row(c):
        customer = customers.get(c.codeword_index)
        return {"customer_id": customer, "assigned": customer is not None, "codeword_index": c.codeword_index, "score": c.score,
                "p_value": c.p_value, "family_p": c.family_p}

    return {
        "model": model,
        "channel": channel,  # weights: a model file read white-box; api: a prediction API queried
        "queries": queries,
        "model_sha256": sha,
        "key_id": key.key_id,
        "layer": key.layer,
        "code_family": codebook.family,
        "code_length": codebook.length,
        "scorer": verdict.scorer,
        "epsilon": verdict.epsilon,
        "threshold": verdict.threshold,
        "customers_scored": verdict.n_customers,
        "codewords_assigned": len(customers),
        "bound": API_BOUND_DESCRIPTION if channel == "api" else BOUND_DESCRIPTION,
        "accused": [row(c) for c in verdict.accused],
        "top_innocent_scores": [row(c) for c in verdict.top_others],
        "alignment": alignment or {},
        "readings": dict(getattr(verdict, "readings", {}) or {}),  # reading -> customers it accused (epsilon split between them)
        "reading_shown": getattr(verdict, "shown", ""),
        "note": verdict.note,
    }


def trace_markdown(report: dict) -> str:
    """The trace report for people: verdict, scores, threshold, bound, alignment."""
    what = "prediction API" if report.get("channel") == "api" else "model"
    lines = [f"# Trace of `{report['model']}`", "",
             (f"- {what}: queried with {report['queries']} key images (black-box fingerprint)" if report.get("channel") == "api"
              else f"- model sha256: `{report['model_sha256']}`"),
             (f"- key id: `{report['key_id']}` ({report['code_family']} code, {report['code_length']} symbols, one per secret pattern)"
              if report.get("channel") == "api" else
              f"- key id: `{report['key_id']}` (layer `{report['layer']}`, {report['code_family']} code, {report['code_length']} bits)"),
             f"- scorer: {report['scorer']}; code words scored: {report['customers_scored']} "
             f"(the whole codebook; {report.get('codewords_assigned', '?')} assigned to customers)",
             f"- epsilon (whole trace): {report['epsilon']:g}; threshold: {report['threshold']:.3f}"
             + (f" (reading `{report['reading_shown']}`; readings decided with epsilon split {len(report['readings'])} ways: "
                + ", ".join(f"{k} accused {v}" for k, v in report["readings"].items()) + ")" if report.get("readings") else ""),
             f"- bound: {report['bound']}", ""]
    if report["accused"]:
        lines += ["## Accused", "", "| customer | code word | score | p-value bound | family-wise p |", "|---|---|---|---|---|"]
        lines += [f"| {_who(a)} | {a['codeword_index']} | {a['score']:.3f} | {a['p_value']:.3g} | {a['family_p']:.3g} |" for a in report["accused"]]
    elif report.get("inconclusive"):
        why = INCONCLUSIVE_REASONS.get(report.get("inconclusive_reason", ""), "see the note")
        lines += [f"## Verdict: inconclusive (no one accused, and that says nothing: {why})"]
    else:
        lines += ["## Verdict: no one accused"]
    if report.get("off_data_ratio") == report.get("off_data_ratio") and report.get("off_data_ratio") is not None:  # not NaN
        lines += ["", f"- off-data weight energy: {report['off_data_ratio']:.2f} x the base model's (natural updates stay near 1)"]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    lines += ["", "## Highest scores below the threshold", "", "| customer | score |", "|---|---|"]
    lines += [f"| {_who(a)} | {a['score']:.3f} |" for a in report["top_innocent_scores"]]
    if report.get("alignment"):
        lines += ["", "## Re-alignment to the base model", "", "| block | channels moved | scale range | weakest match |", "|---|---|---|---|"]
        lines += [f"| {b} | {a['channels_moved']} | {a['scale_min']:.3g} to {a['scale_max']:.3g} | {a['min_similarity']:.3f} |"
                  for b, a in report["alignment"].items()]
    return "\n".join(lines) + "\n"


def _who(row: dict) -> str:
    return row["customer_id"] if row.get("customer_id") is not None else f"{UNASSIGNED} word {row['codeword_index']}"


def score_plot_of(plot: dict, path: Path) -> Path:
    """Every code word's score against the threshold, accused ones in red (PNG at ``path``).
    ``plot``: ``indices``, ``scores``, ``threshold``, ``epsilon``, ``scorer`` and the
    ``accused`` code-word indices (:func:`flows.adapters.trace_log.record`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices, scores = np.asarray(plot["indices"]), np.asarray(plot["scores"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    mask = np.isin(indices, list(plot["accused"]))
    ax.scatter(indices[~mask], scores[~mask], s=6, color="tab:gray", label="customers")
    ax.scatter(indices[mask], scores[mask], s=30, color="tab:red", label="accused")
    ax.axhline(plot["threshold"], color="tab:red", linestyle="--", label=f"threshold (epsilon={plot['epsilon']:g})")
    ax.set_xlabel("code word index")
    ax.set_ylabel(f"{plot['scorer']} score")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def audit_markdown(summary: dict, comparison: list[dict], previous: dict | None) -> str:
    """The robustness audit against the previous one, per attack family and coalition size."""
    regressed = [r for r in comparison if r["status"] == "regressed"]
    lines = ["# Robustness audit", "",
             f"- attacked models: {summary['attacked_models']}; innocents accused: {summary['innocents_accused_total']}",
             f"- compared with: {'the audit of ' + previous['finished_at'] if previous else 'nothing (first audit)'}",
             f"- regressions: {len(regressed)}", "",
             "| attack | c | status | traced now | traced before | worst accuracy |", "|---|---|---|---|---|---|"]

    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    for r in comparison:
        lines.append(f"| {r['attack']} | {r['coalition_size']} | {r['status']} | {fmt(r['traced_now'])} | {fmt(r['traced_before'])} | {fmt(r['accuracy_min_now'])} |")
    return "\n".join(lines) + "\n"
