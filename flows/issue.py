"""``issue`` stage and ``securemark issue``: fingerprinted copies for customers.

For each customer: take (or reuse) a code word from the ledger, embed it into a copy
of the registered base model using only the feature bank, write the customer's
deliverable (weights only, safetensors), register the copy in MLflow
(``securemark-customer``, alias ``customer-<id>``), log the code word to the
vendor-only experiment, and mark the ledger record issued. Re-running for a customer
is safe: the ledger returns the same code word, and an identical copy is not
registered twice.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import socket
import statistics
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file
from tqdm.auto import tqdm

from flows.adapters import artifacts, tracking
from flows.adapters.model_registry import BASE_MODEL, CUSTOMER_MODEL, download_weights, log_classifier, set_alias
from flows.adapters.paths import Paths
from flows.adapters.scaleout import retry_unless_invalid, task_runner
from flows.adapters.settings import Settings
from flows.adapters.vendor import Vendor, make_extractor, make_keyset
from flows.entry.stage import stage_main
from securemark.errors import InvalidConfig
from securemark.blackbox import key_views, targets
from securemark.fingerprint import KeyTargets, carrier_inputs, embed, tail_accuracy
from securemark.model import unit_index
from securemark.key import derive_seed
from securemark.model import accuracy
from securemark.storage import read_partition
from securemark.weights import load_weights, save_weights, sha256_file

ISSUE_EXPERIMENT = "securemark-issue"


def _existing_version(customer_id: str, sha: str):
    """A registered version of this exact copy, if one exists (idempotent re-runs)."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{CUSTOMER_MODEL}' and tags.customer_id='{customer_id}'")
    except mlflow.exceptions.MlflowException:
        return None
    return next((v for v in versions if v.tags.get("weights_sha256") == sha), None)


@lru_cache(maxsize=2)
def _bank_and_test_cached(root: str) -> tuple[dict, tuple]:
    """The feature bank and the test set, read once per process (thread or Dask worker)."""
    paths = Paths(Path(root))
    bank = load_file(str(paths.bank("defended")))
    test_part = read_partition(paths.partition("test"))
    return bank, (test_part.as_float(), test_part.labels)


def _bank_and_test(root: str) -> tuple[dict, tuple]:
    """The feature bank and the test set, read once per process (thread or Dask worker)."""
    with _LOCK:
        return _bank_and_test_cached(root)


_KEY_VIEWS: dict[tuple, tuple] = {}


def _key_views(paths: Paths, settings: Settings, vendor: Vendor, base) -> tuple:
    """The black-box keys and what the carrying block reads for each of their views
    (computed once per process for the same base model)."""
    with _LOCK:
        keyset = make_keyset(paths, settings, vendor)
        cache_key = (id(keyset), settings.blackbox.views, vendor.embed.layer)
        if cache_key not in _KEY_VIEWS:
            _KEY_VIEWS.clear()
            _KEY_VIEWS[cache_key] = (keyset, *key_views(base, vendor.embed.layer, keyset, settings.blackbox.views,
                                                         derive_seed(vendor.secret, "key-views")))
        return _KEY_VIEWS[cache_key]


_LOCK = threading.RLock()  # the caches below are filled once, by whichever task comes first


@lru_cache(maxsize=2)
def _carrier_cached(root: str, base_file: str, layer: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    bank, _ = _bank_and_test(root)
    pick = torch.randperm(len(bank["labels"]), generator=torch.Generator().manual_seed(0))[:rows]  # a fixed sample of the bank
    return carrier_inputs(load_weights(Path(base_file)), layer, bank["features"][pick]), bank["labels"][pick]


@lru_cache(maxsize=2)
def _test_carrier_cached(root: str, base_file: str, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, (images, labels) = _bank_and_test(root)
    base = load_weights(Path(base_file)).eval()
    with torch.no_grad():
        features = torch.cat([base.client(images[i : i + 1000]) for i in range(0, len(images), 1000)])
    return carrier_inputs(base, layer, features), labels


def _test_carrier(root: str, base_file: str, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the carrying block reads for every test image: issuing changes only that block
    and the layers after it, so a copy's test accuracy is computed from here, exactly."""
    with _LOCK:
        return _test_carrier_cached(root, base_file, layer)


def _carrier(root: str, base_file: str, layer: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the carrying block reads for ``rows`` rows of the feature bank, and their
    labels: computed once per process from the base model, shared by every copy."""
    with _LOCK:
        return _carrier_cached(root, base_file, layer, rows)


@task(name="embed-fingerprint", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_invalid, task_run_name="embed-{customer_id}")
def embed_copy(paths: Paths, settings: Settings, base_file: Path, customer_id: str, codeword_index: int) -> dict:
    """Embed one customer's code word and write the deliverable (weights only).

    Runs wherever the flow's task runner puts it (a thread, or a Dask worker that sees
    the project directory and the vendor's secret file): it opens the vendor's state
    itself, so neither the secret, the key nor the code word travels as a task argument;
    it reads the base model and the feature bank from disk and returns the file, its
    hash and the embedding's numbers; nothing here writes to MLflow or the ledger.
    """
    start = time.perf_counter()
    vendor = Vendor.open(paths, settings)
    inputs, labels = _carrier(str(paths.root), str(base_file), vendor.embed.layer, vendor.embed.eval_rows + vendor.embed.train_rows)
    seed = derive_seed(vendor.secret, f"embed|{customer_id}")
    base = load_weights(base_file)
    readout = make_extractor(paths, settings, vendor).readout  # the readout tracing will use (cached per process)
    keys = None
    if settings.blackbox.enabled:  # the black-box word: the labels this copy gives the secret key images
        keyset, key_inputs, key_index, original = _key_views(paths, settings, vendor, base)
        answers = targets(keyset, vendor.blackbox_codebook.word(codeword_index))
        keys = KeyTargets(key_inputs, answers[key_index], original)
    result = embed(base, vendor.codebook.word(codeword_index), vendor.key_matrix, readout,
                   inputs, labels, vendor.embed, torch.Generator().manual_seed(seed), keys)
    out = save_weights(result.model, paths.customer_copy(customer_id))
    test_inputs, test_labels = _test_carrier(str(paths.root), str(base_file), vendor.embed.layer)
    test_accuracy = tail_accuracy(result.model, unit_index(result.model, vendor.embed.layer.rsplit(".", 2)[0]), test_inputs, test_labels)
    return {"customer_id": customer_id, "path": str(out), "weights_sha256": sha256_file(out), "test_accuracy": test_accuracy,
            "ber": result.ber, "min_margin": result.min_margin, "embed_steps": result.steps, "embed_seconds": result.seconds,
            "key_agreement": result.key_agreement,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "task_seconds": time.perf_counter() - start}


def register_copy(paths: Paths, vendor: Vendor, record, base_version: str, base_accuracy: float, embedded: dict) -> dict:
    """Log the copy to MLflow (run, registry version, alias, code word) and close its ledger record."""
    start = time.perf_counter()
    customer_id, sha = record.customer_id, embedded["weights_sha256"]
    tags = {"customer_id": customer_id, "codeword_index": str(record.codeword_index), "key_id": vendor.key.key_id,
            "base_version": base_version, "weights_sha256": sha}
    version = _existing_version(customer_id, sha)
    with tracking.run(f"issue-{customer_id}", ISSUE_EXPERIMENT, paths, tags=tags):
        mlflow.log_params({"customer_id": customer_id, "codeword_index": record.codeword_index, "key_id": vendor.key.key_id,
                           "base_version": base_version, **{f"fingerprint.{k}": v for k, v in asdict(vendor.embed).items()}})
        metrics = {"test_accuracy": embedded["test_accuracy"], "accuracy_drop": (base_accuracy - embedded["test_accuracy"]) * 100,
                   "ber": embedded["ber"], "min_margin": embedded["min_margin"], "embed_steps": embedded["embed_steps"],
                   "embed_seconds": embedded["embed_seconds"]}
        if embedded.get("key_agreement") is not None:
            metrics["key_agreement"] = embedded["key_agreement"]
        mlflow.log_metrics(metrics)
        if version is None:
            version = log_classifier(Path(embedded["path"]), CUSTOMER_MODEL, tags=tags)
    set_alias(CUSTOMER_MODEL, f"customer-{customer_id}", version.version)
    with tracking.run(f"codeword-{customer_id}", tracking.VENDOR_EXPERIMENT, paths, tags={"customer_id": customer_id}):
        bits = vendor.codebook.word(record.codeword_index)
        mlflow.log_dict({"customer_id": customer_id, "codeword_index": record.codeword_index, "key_id": vendor.key.key_id,
                         "bits": "".join(map(str, bits.tolist()))}, f"codewords/{customer_id}.json")
    vendor.ledger.complete(customer_id, str(version.version), sha, reissue=True)
    return {"customer_id": customer_id, "path": embedded["path"], "model_version": str(version.version), **metrics,
            "worker": embedded["worker"], "seconds": embedded["task_seconds"] + time.perf_counter() - start}


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

    Code words are assigned in order first (so who gets which word does not depend on
    scheduling), then the embeddings fan out over the task runner, then each copy is
    registered from this process.
    """
    logger = get_run_logger()
    tracking.configure(paths)
    customers = customers or settings.issue.customer_ids()
    base_version = registered_base(paths, base_uri)
    base_file = paths.base_model
    base = load_weights(base_file)
    vendor = Vendor.open(paths, settings)
    records = [vendor.ledger.assign(c, vendor.key.key_id) for c in customers]
    _, test = _bank_and_test(str(paths.root))
    base_accuracy = accuracy(base, *test)
    futures = [embed_copy.submit(paths, settings, base_file, r.customer_id, r.codeword_index) for r in records]
    rows = []
    for record, future in tqdm(list(zip(records, futures)), desc="issuing copies", unit="copy"):
        rows.append(register_copy(paths, vendor, record, str(base_version), base_accuracy, future.result()))
    for row in rows:
        logger.info("issued %s -> %s (BER %.3f, min margin %.3f, accuracy drop %.2f pt, on %s)", row["customer_id"], row["path"], row["ber"], row["min_margin"], row["accuracy_drop"], row["worker"])
    artifacts.publish_table(artifacts.ISSUED, [{k: row[k] for k in ("customer_id", "model_version", "ber", "min_margin", "accuracy_drop", "worker")} for row in rows],
                    "Copies issued by this run: registry version, bit error rate after embedding, accuracy drop (points)")
    return rows


def run_issue(paths: Paths, settings: Settings, customers: list[str] | None = None) -> list[dict]:
    """``issue_flow`` on the task runner the settings / environment ask for (thread pool or Dask)."""
    return issue_flow.with_options(task_runner=task_runner(settings.ops))(paths, settings, customers)


def fingerprint_metrics(rows: list[dict], code_length: int) -> dict:
    drops = [r["accuracy_drop"] for r in rows]
    return {
        "copies": len(rows),
        "code_length": code_length,
        "accuracy_drop_mean": statistics.fmean(drops),
        "accuracy_drop_max": max(drops),
        "ber_max": max(r["ber"] for r in rows),
        "margin_min": min(r["min_margin"] for r in rows),
        "seconds_per_copy": statistics.fmean(r["embed_seconds"] for r in rows),
        "seconds_per_copy_with_registration": statistics.fmean(r["seconds"] for r in rows),
        "key_agreement_min": min((r["key_agreement"] for r in rows if r.get("key_agreement") is not None), default=None),
    }


def _stage(paths: Paths, settings: Settings) -> None:
    rows = run_issue(paths, settings)
    code_length = Vendor.open(paths, settings).codebook.length  # every family knows its length (bibd has no code_length param)
    tracking.write_json(fingerprint_metrics(rows, code_length), paths.fingerprint_metrics)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="issue stage: fingerprinted copies for the default customers").parse_args(argv)
    stage_main(_stage)


if __name__ == "__main__":
    main()
