"""``blackbox`` stage: every issued copy traced through a prediction API, and null APIs.

Each copy is served on 127.0.0.1 by :func:`flows.adapters.api_server.serve_predictions`
(label-only, SecureMark's JSON protocol) and traced over HTTP exactly as
``securemark trace --endpoint URL`` does (one MLflow run and report per copy). Then:

- **null APIs**, which carry none of the black-box words: the base model and the
  models the attacker trained alone (under the vendor's keys), and every served model
  (copies included) examined under ``blackbox.null_secrets`` other vendors' keys and
  codebooks (null secrets derived from ``base.seed``). None may accuse anyone.
- **accuracy cost**: for ``blackbox.cost_copies`` customers, the copy is embedded
  again with the weight fingerprint only (same seed); the difference in test accuracy
  is what the black-box marks cost on top of the weight fingerprint.
- **hard-label distillation through the API**: for ``blackbox.distill_trials`` copies,
  a fresh network of the same architecture is trained on the attacker's images
  labelled by the copy's API (``attack`` defaults for ``distill``), then traced through
  its own API; its agreement with the leaker's black-box word is recorded.
- **query filters**: the attacker's ``query_filter`` (max-softmax or feature-distance
  detector refusing 5 % of its own images; refused queries answered by its own network
  or by the runner-up label) in front of the first copy: refusal rates on natural test
  images and on the keys, and whether tracing still succeeds.

Writes ``metrics/blackbox.json`` and logs one MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import mlflow
import torch
from prefect import flow, get_run_logger
from tqdm.auto import tqdm

from flows.adapters import tracking
from flows.adapters.api_server import serve_predictions
from flows.adapters.endpoint import PredictionAPI
from flows.adapters.partitions import attacker_data, test_set
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.vendor import open_vendor
from flows.adapters.stage import stage_main
from flows.tracing import trace_endpoint
from securemark.attacks import AttackData, create_attack
from securemark.tracing.blackbox import agreement, label_api
from securemark.embedding import Job, embed_batch
from securemark.key import derive_seed, null_secret
from securemark.model import SplitNet, accuracy
from securemark.vendor import Vendor
from securemark.weights import load_weights


def _api(url: str, settings: Settings) -> PredictionAPI:
    bb = settings.blackbox
    return PredictionAPI(url, "json", bb.batch, bb.timeout, bb.retries, bb.max_response_bytes, budget=None)


def trace_copies(paths: Paths, settings: Settings, vendor: Vendor) -> list[dict]:
    """Every issued copy served and traced over HTTP, as ``trace --endpoint`` would."""
    issued = vendor.issued_codewords()
    rows = []
    for copy in tqdm(paths.issued_copies(), desc="tracing copies through their APIs", unit="copy"):
        model = load_weights(copy)
        start = time.perf_counter()
        with serve_predictions(lambda x, m=model: m.eval()(x)) as url:
            report = trace_endpoint(paths, settings, url, vendor=vendor)
        accused = [a["customer_id"] for a in report["accused"]]
        rows.append({"customer_id": copy.parent.name, "accused": accused, "queries": report["queries"],
                     "correct": accused == [copy.parent.name] and copy.parent.name in issued,
                     "seconds": round(time.perf_counter() - start, 2)})
    return rows


def null_apis(paths: Paths, settings: Settings, vendor: Vendor) -> list[dict]:
    """Verdicts for APIs that carry none of the words they are scored against."""
    bb, cfg = settings.blackbox, settings.trace
    own = vendor.api_probe()
    others = [vendor.api_probe(null_secret(settings.base.seed, "blackbox", j)) for j in range(bb.null_secrets)]
    models: list[tuple[str, SplitNet, bool]] = [("base", load_weights(paths.base_model), True)]
    models += [(f"attacker-alone-{b}", load_weights(paths.attacker_alone_model(b)), True) for b in settings.attacker.budgets]
    models += [(c.parent.name, load_weights(c), False) for c in paths.issued_copies()]  # a copy is null only under other keys
    rows = []
    for name, model, null_under_own in tqdm(models, desc="null APIs", unit="model"):
        with serve_predictions(lambda x, m=model: m.eval()(x)) as url:
            probes = ([("vendor", own)] if null_under_own else []) + [(f"null-{j}", p) for j, p in enumerate(others)]
            for key_name, probe in probes:
                start = time.perf_counter()
                result = probe.trace(_api(url, settings).predict, cfg.epsilon)
                rows.append({"model": name, "keys": key_name, "accused": len(result.verdict.accused), "queries": result.queries,
                             "max_score_ratio": float(result.verdict.scores.max() / result.verdict.threshold),
                             "seconds": round(time.perf_counter() - start, 3)})
    return rows


def accuracy_cost(paths: Paths, settings: Settings, vendor: Vendor) -> list[dict]:
    """Test accuracy of ``cost_copies`` issued copies (both marks) and of the same code
    words embedded the same way (batched, same seeds) with the weight fingerprint only:
    the black-box marks' own cost, in points."""
    weights_only = dataclasses.replace(settings, blackbox=dataclasses.replace(settings.blackbox, enabled=False))
    space, _, _ = open_vendor(paths, weights_only).carrier_space()  # the same vendor, its carrier space without key rows
    test = test_set(paths)
    chosen = list(sorted(vendor.issued_codewords().items()))[: settings.blackbox.cost_copies]
    jobs = [Job(customer_id, vendor.codebook.word(index), None, derive_seed(vendor.secret, f"embed|{customer_id}")) for customer_id, index in chosen]
    start = time.perf_counter()
    outcomes = embed_batch(space, jobs, vendor.config.embed)
    seconds = (time.perf_counter() - start) / max(len(jobs), 1)
    rows = []
    for (customer_id, _), outcome in zip(chosen, outcomes):
        if outcome.error is not None:
            raise outcome.error
        a_both = accuracy(load_weights(paths.customer_copy(customer_id)), *test)
        a_weights = accuracy(outcome.result.model, *test)
        rows.append({"customer_id": customer_id, "accuracy": a_both, "accuracy_weights_only": a_weights,
                     "cost_points": (a_weights - a_both) * 100, "seconds_weights_only": seconds})
    return rows


def distillation(paths: Paths, settings: Settings, vendor: Vendor) -> list[dict]:
    """Hard-label distillation of ``distill_trials`` copies through their APIs into fresh
    networks (same architecture, the attacker's images), each student traced by its API."""
    cfg = settings.trace
    own = attacker_data(paths, settings)
    test = test_set(paths)
    probe = vendor.api_probe()
    issued = vendor.issued_codewords()
    attack = create_attack("distill", labels="hard")
    rows = []
    for trial, copy in enumerate(tqdm(paths.issued_copies()[: settings.blackbox.distill_trials], desc="distillation through the API", unit="student")):
        teacher = load_weights(copy)
        with serve_predictions(lambda x, m=teacher: m.eval()(x)) as url:  # the student learns what the API answers
            api = _api(url, settings)
            labelled = api.predict(own.images)
        data = AttackData(own.images, labelled)  # the API's labels, not the attacker's own
        student = attack([teacher], data, torch.Generator().manual_seed(settings.base.seed + trial))
        with serve_predictions(lambda x, m=student: m.eval()(x)) as url:
            result = probe.trace(_api(url, settings).predict, cfg.epsilon)
        word = vendor.blackbox_codebook.word(issued[copy.parent.name])
        accused = {c.codeword_index for c in result.verdict.accused}
        rows.append({"customer_id": copy.parent.name, "student_accuracy": accuracy(student, *test), "copy_accuracy": accuracy(teacher, *test),
                     "traced": issued[copy.parent.name] in accused, "innocents_accused": len(accused - {issued[copy.parent.name]}),
                     "key_agreement": agreement(probe.keys, word, label_api(student)(probe.keys.images)), "queries": result.queries})
    return rows


def query_filters(paths: Paths, settings: Settings, vendor: Vendor) -> list[dict]:
    """The attacker's query filter (``query_filter``, tuned on its own images to refuse
    5 % of them) in front of the first issued copy: the share of natural test images and
    of key queries it refuses, and whether the filtered API is still traced."""
    cfg = settings.trace
    data = attacker_data(paths, settings)
    test_images, test_labels = test_set(paths)
    probe = vendor.api_probe()
    issued = vendor.issued_codewords()
    rows = []
    for copy in paths.issued_copies()[:1]:
        alone = None  # the attacker's own network (fallback "alone"): the same for both detectors, so trained once
        for detector in tqdm(("softmax", "distance"), desc="query filters", unit="detector"):
            for fallback in ("alone", "second"):
                api = create_attack("query_filter", detector=detector, refuse=0.05, fallback=fallback, alone=alone if fallback == "alone" else None)(
                    [load_weights(copy)], data, torch.Generator().manual_seed(settings.base.seed))
                if fallback == "alone":
                    alone = api.fallback
                with serve_predictions(api) as url:
                    result = probe.trace(_api(url, settings).predict, cfg.epsilon)
                accused = {c.codeword_index for c in result.verdict.accused}
                rows.append({"customer_id": copy.parent.name, "detector": detector, "fallback": fallback,
                             "refused_test": float(api.unusual(test_images).double().mean()),
                             "refused_keys": float(api.unusual(probe.keys.images).double().mean()),
                             "traced": issued[copy.parent.name] in accused, "innocents_accused": len(accused - {issued[copy.parent.name]}),
                             "accuracy": accuracy(api, test_images, test_labels)})
    return rows


@flow(name="blackbox-tracing", validate_parameters=False)
def blackbox_flow(paths: Paths, settings: Settings) -> dict:
    logger = get_run_logger()
    tracking.configure(paths)
    vendor = open_vendor(paths, settings)
    start = time.perf_counter()
    copies = trace_copies(paths, settings, vendor)
    nulls = null_apis(paths, settings, vendor)
    cost = accuracy_cost(paths, settings, vendor)
    students = distillation(paths, settings, vendor)
    filters = query_filters(paths, settings, vendor)
    alone = {r["budget"]: r["accuracy"] for r in json.loads(paths.attacker_baseline.read_text())}.get(settings.attacker.budget)
    metrics = {
        "copies": len(copies),
        "copies_correct": sum(r["correct"] for r in copies),
        "queries_max": max((r["queries"] for r in copies), default=0),
        "queries_mean": statistics.fmean(r["queries"] for r in copies) if copies else 0.0,
        "trace_seconds_max": max((r["seconds"] for r in copies), default=0.0),
        "null_apis": len(nulls),
        "null_accusations": sum(r["accused"] for r in nulls),
        "max_null_score_ratio": max((r["max_score_ratio"] for r in nulls), default=0.0),
        "null_queries_max": max((r["queries"] for r in nulls), default=0),
        "null_read_seconds_max": max((r["seconds"] for r in nulls), default=0.0),  # a full read over HTTP, no MLflow run
        "accuracy_cost_max": max((r["cost_points"] for r in cost), default=0.0),
        "accuracy_cost_mean": statistics.fmean(r["cost_points"] for r in cost) if cost else 0.0,
        "distillation_trials": len(students),
        "distillation_traced": sum(r["traced"] for r in students),
        "distillation_worth_it": sum(alone is not None and r["student_accuracy"] > alone for r in students),
        "distillation_key_agreement_mean": statistics.fmean(r["key_agreement"] for r in students) if students else None,
        "distillation_innocents_accused": sum(r["innocents_accused"] for r in students),
        "filter_refused_test_max": max((r["refused_test"] for r in filters), default=None),
        "filter_refused_keys_min": min((r["refused_keys"] for r in filters), default=None),
        "filter_refused_keys_max": max((r["refused_keys"] for r in filters), default=None),
        "filter_traced": sum(r["traced"] for r in filters),
        "filter_trials": len(filters),
        "keys": settings.blackbox.keys,
        "patterns": settings.blackbox.symbols,  # symbols of a black-box word (patterns, or natural keys)
        "epsilon": settings.trace.epsilon,
        "customers_in_codebook": len(vendor.blackbox_codebook),
        "seconds": round(time.perf_counter() - start, 1),
    }
    with tracking.run("blackbox-stage", tracking.TRACE_EXPERIMENT, paths, tags={"stage": "blackbox"}):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_dict({"copies": copies, "nulls": nulls, "accuracy_cost": cost, "distillation": students,
                        "query_filters": filters}, "blackbox_stage.json")
    logger.info("blackbox stage: %s", metrics)
    return metrics


def _stage(paths: Paths, settings: Settings) -> None:
    tracking.write_json(blackbox_flow(paths, settings), paths.blackbox_metrics)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="blackbox stage: trace issued copies and null models through prediction APIs").parse_args(argv)
    stage_main(_stage)


if __name__ == "__main__":
    main()
