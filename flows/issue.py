"""``issue`` stage and ``securemark issue``: fingerprinted copies for customers.

Code words are taken from the ledger first (in the customers' order, so who gets which
word does not depend on scheduling); customers whose copy is already issued and on disk
are skipped, so a re-run issues exactly the missing copies, with the words they were
given the first time. The others are embedded in batches (``issue.batch`` customers per
task, :func:`securemark.embedding.embed_batch`: everything before the trained block is
computed once per process), each copy's deliverable (weights only, safetensors) is
written, then registered in MLflow (``securemark-customer``, alias
``customer-<id>``), its code word logged to the vendor-only experiment and its ledger
record marked issued. A copy that could not be embedded is named, with what was short,
after every other copy is delivered; its word stays reserved for the re-run.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from flows.adapters import artifacts, tracking
from flows.adapters.model_registry import (BASE_MODEL, CUSTOMER_MODEL, download_weights, ensure_registered_model, pyfunc_template,
                                          register_weights, set_alias)
from flows.adapters.paths import Paths
from flows.adapters.scaleout import results_in_order, retry_unless_invalid, task_runner
from flows.adapters.settings import Settings
from flows.adapters.vendor import open_vendor
from flows.adapters.stage import stage_main
from securemark.embedding import copy_accuracy
from securemark.errors import InvalidConfig, SecureMarkError
from securemark.ledger import ISSUED
from securemark.private_files import tighten
from securemark.vendor import Vendor
from securemark.weights import save_weights, sha256_file

ISSUE_EXPERIMENT = "securemark-issue"


class IssuingFailed(SecureMarkError):
    """Some copies could not be embedded within the step budget; their words stay reserved."""


def _existing_version(customer_id: str, sha: str):
    """A registered version of this exact copy, if one exists (idempotent re-runs)."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{CUSTOMER_MODEL}' and tags.customer_id='{customer_id}'")
    except mlflow.exceptions.MlflowException:
        return None
    return next((v for v in versions if v.tags.get("weights_sha256") == sha), None)


@task(name="embed-fingerprints", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_invalid,
      task_run_name="embed-{first}-and-{more}-more")
def embed_copies(paths: Paths, settings: Settings, base_file: Path, customers: list[tuple[str, int]], first: str = "", more: int = 0) -> list[dict]:
    """Embed the code words of ``customers`` ((id, code-word index) pairs) in one rolling
    batch (``issue.batch`` at a time) and write each deliverable (weights only).

    Runs wherever the flow's task runner puts it (a thread, or a Dask worker that sees
    the project directory and the vendor's secret file): it opens the vendor's state
    itself, so neither the secret, the key nor a code word travels as a task argument;
    it returns, per customer, the file, its hash and the embedding's numbers (or the
    failure); nothing here writes to MLflow or the ledger.
    """
    start = time.perf_counter()
    vendor = open_vendor(paths, settings)
    space, test_rows, test_labels = vendor.carrier_space(base_file)  # persisted in the vendor state: loaded, not rebuilt
    embed_start = time.perf_counter()
    outcomes = vendor.embed(customers, base_file, width=settings.issue.batch)
    embed_seconds = (time.perf_counter() - embed_start) / len(customers)  # the batch's wall time, per copy
    worker = f"{socket.gethostname()}:{os.getpid()}"
    rows = []
    for outcome in outcomes:
        if outcome.error is not None:
            rows.append({"customer_id": outcome.name, "error": str(outcome.error), "worker": worker})
            continue
        result = outcome.result
        out = save_weights(result.model, paths.customer_copy(outcome.name))
        rows.append({"customer_id": outcome.name, "path": str(out), "weights_sha256": sha256_file(out),
                     "test_accuracy": copy_accuracy(space, result.model, test_rows, test_labels),
                     "ber": result.ber, "min_margin": result.min_margin, "embed_steps": result.steps, "mark_steps": result.mark_steps,
                     "embed_seconds": embed_seconds, "key_agreement": result.key_agreement, "keys_shed": result.keys_shed, "worker": worker})
    seconds = (time.perf_counter() - start) / len(customers)
    for row in rows:
        row["task_seconds"] = seconds
    return rows


def register_copies(paths: Paths, vendor: Vendor, issued: list[tuple], base_version: str, base_accuracy: float, template: Path,
                    progress=None) -> list[dict]:
    """Log the copies ``issued`` ((ledger record, embedded row) pairs) to MLflow and close
    their ledger records, in order; returns one row per copy.

    Each copy gets its own run in ``securemark-issue`` (params, metrics, the pyfunc model),
    a registry version with the alias ``customer-<id>`` (an identical version already
    registered is reused) and its code word in one vendor-only run for the whole batch
    (``codewords/<id>.json``), before its ledger record is marked issued: a copy whose
    registration fails stays pending and a re-run completes it. The experiments, the
    registered model and the code-word run are set up once per batch, and the runs are
    written through the client (no active-run bookkeeping per copy). ``progress``: called
    after each copy."""
    if not issued:
        return []
    tracking.configure(paths)
    client = MlflowClient()
    issue_experiment = tracking.experiment(ISSUE_EXPERIMENT, paths)
    vendor_experiment = tracking.experiment(tracking.VENDOR_EXPERIMENT, paths)
    tighten(paths.mlflow_db)  # the default store: owner-only (no-op for another store)
    ensure_registered_model(CUSTOMER_MODEL, client)
    key_id = vendor.key.key_id
    config = {f"fingerprint.{k}": v for k, v in asdict(vendor.config.embed).items()}
    context = resolve_tags()  # what mlflow.start_run adds (user, source, git commit), resolved once for the batch
    first = issued[0][0].customer_id
    codewords = client.create_run(vendor_experiment, run_name=f"codewords-{first}-and-{len(issued) - 1}-more", tags={**context, "key_id": key_id})
    codeword_store = tracking.artifact_store(codewords)
    rows, status = [], "FAILED"
    try:
        for record, embedded in issued:
            start = time.perf_counter()
            customer_id, sha = record.customer_id, embedded["weights_sha256"]
            tags = {"customer_id": customer_id, "codeword_index": str(record.codeword_index), "key_id": key_id,
                    "base_version": base_version, "weights_sha256": sha}
            metrics = {"test_accuracy": embedded["test_accuracy"], "accuracy_drop": (base_accuracy - embedded["test_accuracy"]) * 100,
                       "ber": embedded["ber"], "min_margin": embedded["min_margin"], "embed_steps": embedded["embed_steps"],
                       "embed_seconds": embedded["embed_seconds"]}
            if embedded.get("key_agreement") is not None:
                metrics["key_agreement"] = embedded["key_agreement"]
                metrics["keys_shed"] = embedded.get("keys_shed", 0)
            params = {"customer_id": customer_id, "codeword_index": record.codeword_index, "key_id": key_id, "base_version": base_version, **config}
            run = client.create_run(issue_experiment, run_name=f"issue-{customer_id}", tags={**context, **tags})
            try:
                tracking.log_batch_to(client, run.info.run_id, params, metrics)
                version = _existing_version(customer_id, sha) or register_weights(Path(embedded["path"]), CUSTOMER_MODEL, tags, template, run, client)
            except BaseException:
                client.set_terminated(run.info.run_id, status="FAILED")
                raise
            client.set_terminated(run.info.run_id)
            set_alias(CUSTOMER_MODEL, f"customer-{customer_id}", version.version)
            bits = vendor.codebook.word(record.codeword_index)
            tracking.log_json(codeword_store, {"customer_id": customer_id, "codeword_index": record.codeword_index, "key_id": key_id,
                                               "bits": "".join(map(str, bits.tolist()))}, f"codewords/{customer_id}.json")
            vendor.ledger.complete(customer_id, str(version.version), sha, reissue=True)
            rows.append({"customer_id": customer_id, "path": embedded["path"], "model_version": str(version.version), **metrics,
                         "worker": embedded["worker"], "seconds": embedded["task_seconds"] + time.perf_counter() - start})
            if progress is not None:
                progress()
        status = "FINISHED"
    finally:
        client.set_terminated(codewords.info.run_id, status=status)
    return rows


def missing_copies(paths: Paths, records: list) -> list:
    """The records whose copy is not issued yet, or whose delivered file is gone or is not
    the one the ledger recorded (a re-run re-embeds them with the same code word)."""
    def intact(record) -> bool:
        copy = paths.customer_copy(record.customer_id)
        return record.status == ISSUED and copy.is_file() and sha256_file(copy) == record.weights_sha256
    return [r for r in records if not intact(r)]


def registered_base(paths: Paths, base_uri: str) -> str:
    """The registry version of the base model copies are issued from, after checking it
    is the local base file (the base every trace aligns to and reads from)."""
    with tempfile.TemporaryDirectory(prefix="securemark-base-") as tmp:
        try:
            registered = download_weights(base_uri, Path(tmp))
            version = MlflowClient().get_model_version_by_alias(BASE_MODEL, "latest").version if base_uri.endswith("@latest") else base_uri
        except mlflow.exceptions.MlflowException as exc:
            raise InvalidConfig(f"no base model to issue copies from ({base_uri}: {str(exc).splitlines()[0][:160]}); "
                                "train and register one first: `dvc repro train` or `make run`") from None
        if not paths.base_model.is_file() or sha256_file(registered) != sha256_file(paths.base_model):
            raise InvalidConfig(f"the base model {base_uri} is not {paths.base_model}, the base every trace aligns to and reads "
                                "from: re-run the train stage (or register that file) so both are the same model")
    return str(version)


@flow(name="issue-fingerprinted-copies", validate_parameters=False)
def issue_flow(paths: Paths, settings: Settings, customers: list[str] | None = None, base_uri: str = f"models:/{BASE_MODEL}@latest") -> list[dict]:
    """Issue fingerprinted copies to ``customers`` (default: the settings' customer set).

    Returns one row per copy issued by this run (customers already issued, with their
    copy intact, are skipped and logged). Raises :class:`IssuingFailed` naming every
    customer whose copy could not be made, after the others are delivered.
    """
    logger = get_run_logger()
    tracking.configure(paths)
    customers = customers or settings.issue.customer_ids()
    base_version = registered_base(paths, base_uri)
    base_file = paths.base_model
    vendor = open_vendor(paths, settings)
    records = vendor.ledger.assign_many(customers, vendor.key.key_id)
    todo = missing_copies(paths, records)
    if len(todo) < len(records):
        logger.info("%d of %d customers already hold their issued copy; issuing the other %d", len(records) - len(todo), len(records), len(todo))
    size = settings.issue.task
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    setup_start = time.perf_counter()
    space, test_rows, test_labels = vendor.carrier_space(base_file)  # built (or loaded) once here; the tasks load it
    base_accuracy = copy_accuracy(space, space.base, test_rows, test_labels)
    setup_seconds = time.perf_counter() - setup_start
    calls = [((paths, settings, base_file, [(r.customer_id, r.codeword_index) for r in batch]),
              dict(first=batch[0].customer_id, more=len(batch) - 1)) for batch in batches]
    results = results_in_order(embed_copies, calls, settings.ops)
    rows, failures = [], []
    with tqdm(total=len(todo), desc="issuing copies", unit="copy") as bar, pyfunc_template() as template:
        for batch, result in zip(batches, results):
            by_id = {r.customer_id: r for r in batch}
            failed = [e["error"] for e in result if "error" in e]
            failures += failed
            bar.update(len(failed))
            embedded = [(by_id[e["customer_id"]], e) for e in result if "error" not in e]
            rows += register_copies(paths, vendor, embedded, str(base_version), base_accuracy, template, progress=lambda: bar.update(1))
    for row in rows:
        row["setup_seconds"] = setup_seconds
        shed = f", {row['keys_shed']:.0f} key flips given back" if row.get("keys_shed") else ""
        logger.info("issued %s -> %s (BER %.3f, min margin %.3f, accuracy drop %.2f pt%s, on %s)", row["customer_id"], row["path"], row["ber"],
                    row["min_margin"], row["accuracy_drop"], shed, row["worker"])
    artifacts.publish_table(artifacts.ISSUED, [{k: row[k] for k in ("customer_id", "model_version", "ber", "min_margin", "accuracy_drop", "worker")} for row in rows],
                    "Copies issued by this run: registry version, bit error rate after embedding, accuracy drop (points)")
    if failures:
        raise IssuingFailed(f"{len(failures)} of {len(todo)} copies could not be made (their code words stay reserved; re-run to "
                            "issue exactly these): " + "; ".join(failures))
    return rows


def run_issue(paths: Paths, settings: Settings, customers: list[str] | None = None) -> list[dict]:
    """``issue_flow`` on the task runner the settings / environment ask for (the flow's thread or Dask)."""
    return issue_flow.with_options(task_runner=task_runner(settings.ops))(paths, settings, customers)


def fingerprint_metrics(rows: list[dict], code_length: int, wall_seconds: float) -> dict:
    """The stage's numbers. ``seconds_per_copy_with_registration`` is the issuing wall time
    per copy (embedding, files, ledger, MLflow run and model version) after the once-per-
    process set-up (``setup_seconds``: the shared carrier space), which ``wall_seconds``
    includes."""
    drops = [r["accuracy_drop"] for r in rows]
    setup = max((r.get("setup_seconds", 0.0) for r in rows), default=0.0)
    return {
        "copies": len(rows),
        "code_length": code_length,
        "accuracy_drop_mean": statistics.fmean(drops),
        "accuracy_drop_max": max(drops),
        "ber_max": max(r["ber"] for r in rows),
        "margin_min": min(r["min_margin"] for r in rows),
        "seconds_per_copy": statistics.fmean(r["embed_seconds"] for r in rows),
        "seconds_per_copy_with_registration": (wall_seconds - setup) / len(rows),
        "setup_seconds": setup,
        "wall_seconds": wall_seconds,
        "key_agreement_min": min((r["key_agreement"] for r in rows if r.get("key_agreement") is not None), default=None),
        "copies_with_keys_shed": sum(1 for r in rows if r.get("keys_shed")),  # fingerprint.shed_keys: retried with flips given back
        "keys_shed_max": max((r.get("keys_shed", 0) for r in rows), default=0),
    }


def _stage(paths: Paths, settings: Settings) -> None:
    start = time.perf_counter()
    rows = run_issue(paths, settings)
    wall = time.perf_counter() - start
    if not rows:  # run by hand after every copy was issued (DVC removes the copies before it re-runs the stage)
        logging.getLogger(__name__).info("every customer already holds its issued copy; %s describes those copies and is left as it is",
                                         paths.fingerprint_metrics)
        return
    code_length = open_vendor(paths, settings).codebook.length  # every family knows its length (bibd has no code_length param)
    tracking.write_json(fingerprint_metrics(rows, code_length, wall), paths.fingerprint_metrics)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="issue stage: fingerprinted copies for the default customers").parse_args(argv)
    stage_main(_stage)


if __name__ == "__main__":
    main()
