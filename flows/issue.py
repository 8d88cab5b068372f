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
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file
from tqdm.auto import tqdm

from flows import tracking
from flows.entry import stage_main
from flows.project import Paths, section
from flows.registry import BASE_MODEL, CUSTOMER_MODEL, download_weights, log_classifier, set_alias
from flows.train import bank_path
from flows.vendor import Vendor
from securemark.fingerprint import embed, layer_weight
from securemark.key import derive_seed
from securemark.model import accuracy
from securemark.storage import read_partition
from securemark.weights import load_weights, save_weights, sha256_file

ISSUE_EXPERIMENT = "securemark-issue"
VENDOR_EXPERIMENT = "securemark-vendor-codewords"  # vendor-only: holds code words


def default_customers(params: dict) -> list[str]:
    count = int(section(params, "issue")["customers"])
    return [f"customer-{i:04d}" for i in range(1, count + 1)]


def delivery_path(paths: Paths, customer_id: str) -> Path:
    return paths.root / "data" / "customers" / customer_id / "model.safetensors"


def _existing_version(customer_id: str, sha: str):
    """A registered version of this exact copy, if one exists (idempotent re-runs)."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{CUSTOMER_MODEL}' and tags.customer_id='{customer_id}'")
    except mlflow.exceptions.MlflowException:
        return None
    return next((v for v in versions if v.tags.get("weights_sha256") == sha), None)


@task(name="issue-copy", cache_policy=NO_CACHE, retries=1)
def issue_copy(paths: Paths, vendor: Vendor, base, base_version: str, base_accuracy: float, bank: dict, test: tuple, customer_id: str) -> dict:
    """Issue one customer's copy; returns its row for metrics/fingerprint.json."""
    start = time.perf_counter()
    record = vendor.ledger.assign(customer_id, vendor.key.key_id)
    bits = vendor.codebook.word(record.codeword_index)
    generator = torch.Generator().manual_seed(derive_seed(vendor.secret, f"embed|{customer_id}"))
    result = embed(base, bits, vendor.key_matrix, bank["features"], bank["labels"], vendor.embed, generator)
    out = save_weights(result.model, delivery_path(paths, customer_id))
    sha = sha256_file(out)
    test_accuracy = accuracy(result.model, *test)
    tags = {"customer_id": customer_id, "codeword_index": str(record.codeword_index), "key_id": vendor.key.key_id,
            "base_version": base_version, "weights_sha256": sha}
    version = _existing_version(customer_id, sha)
    with tracking.run(f"issue-{customer_id}", ISSUE_EXPERIMENT, paths, tags=tags):
        mlflow.log_params({"customer_id": customer_id, "codeword_index": record.codeword_index, "key_id": vendor.key.key_id,
                           "base_version": base_version, **{f"fingerprint.{k}": v for k, v in asdict(vendor.embed).items()}})
        metrics = {"test_accuracy": test_accuracy, "accuracy_drop": (base_accuracy - test_accuracy) * 100, "ber": result.ber,
                   "min_margin": result.min_margin, "embed_steps": result.steps, "embed_seconds": result.seconds}
        mlflow.log_metrics(metrics)
        if version is None:
            version = log_classifier(out, CUSTOMER_MODEL, tags=tags)
    set_alias(CUSTOMER_MODEL, f"customer-{customer_id}", version.version)
    with tracking.run(f"codeword-{customer_id}", VENDOR_EXPERIMENT, paths, tags={"customer_id": customer_id}):
        mlflow.log_dict({"customer_id": customer_id, "codeword_index": record.codeword_index, "key_id": vendor.key.key_id,
                         "bits": "".join(map(str, bits.tolist()))}, f"codewords/{customer_id}.json")
    vendor.ledger.complete(customer_id, str(version.version), sha, reissue=True)
    return {"customer_id": customer_id, "path": str(out), "model_version": str(version.version), **metrics,
            "seconds": time.perf_counter() - start}


@flow(name="issue-fingerprinted-copies")
def issue_flow(paths: Paths, params: dict, customers: list[str] | None = None, base_uri: str = f"models:/{BASE_MODEL}@latest") -> list[dict]:
    """Issue fingerprinted copies to ``customers`` (default: the params' customer set)."""
    logger = get_run_logger()
    tracking.configure(paths)
    customers = customers or default_customers(params)
    base = load_weights(download_weights(base_uri))
    base_version = MlflowClient().get_model_version_by_alias(BASE_MODEL, "latest").version if base_uri.endswith("@latest") else base_uri
    vendor = Vendor.open(paths, params, layer_weight(base, section(params, "fingerprint")["layer"]).numel())
    bank = load_file(str(bank_path(paths, "defended")))
    test_part = read_partition(paths.partition("test"))
    test = (test_part.as_float(), test_part.labels)
    base_accuracy = accuracy(base, *test)
    rows = [issue_copy(paths, vendor, base, str(base_version), base_accuracy, bank, test, c) for c in tqdm(customers, desc="issuing copies", unit="copy")]
    for row in rows:
        logger.info("issued %s -> %s (BER %.3f, min margin %.3f, accuracy drop %.2f pt)", row["customer_id"], row["path"], row["ber"], row["min_margin"], row["accuracy_drop"])
    return rows


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
    }


def _stage(paths: Paths, params: dict) -> None:
    rows = issue_flow(paths, params)
    code_length = int(section(params, "fingerprint")["code"]["code_length"])
    tracking.write_json(fingerprint_metrics(rows, code_length), paths.metrics / "fingerprint.json")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="issue stage: fingerprinted copies for the default customers").parse_args(argv)
    stage_main(_stage)


if __name__ == "__main__":
    main()
