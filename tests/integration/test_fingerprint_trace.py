"""Issue fingerprinted copies of a model trained on real Fashion-MNIST partitions, then
trace them back: through the flows (Prefect test harness, MLflow on a temporary SQLite
file) and through the ``securemark trace`` command."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import time
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors import safe_open
from safetensors.torch import load_file

from flows.adapters.model_registry import CUSTOMER_MODEL, load_registered
from flows.adapters.paths import Paths
from flows.adapters.vendor import open_vendor
from flows.adapters.tracking import TRACE_EXPERIMENT
from securemark.ledger import ISSUED
from securemark.model import SplitNet
from securemark.vendor import Vendor
from securemark.weights import SPEC_KEY
from tests.conftest import SMALL, isolated_copy

pytestmark = pytest.mark.integration

CUSTOMERS = ["alice", "bob"]


@dataclass(frozen=True)
class Issued:
    paths: Paths
    uri: str                 # MLflow tracking URI of this project
    rows: list[dict]         # issue_flow's rows, in CUSTOMERS order
    prefect_api_url: str     # the harness server, for subprocesses

    def delivered(self, customer: str) -> Path:
        return self.paths.customer_copy(customer)

    def vendor(self) -> Vendor:
        return open_vendor(self.paths, SMALL)

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def issued(prepared_project, prefect_harness, tmp_path_factory):
    """A copy of the prepared project with a trained base model and copies issued to
    alice and bob (built once for the module; MLFLOW_TRACKING_URI stays set to the
    project's store until the module ends)."""
    import prefect.settings

    from flows.issue import issue_flow
    from flows.train import train_flow

    with isolated_copy(prepared_project, tmp_path_factory.mktemp("fingerprint") / "project") as (paths, _):
        uri = f"sqlite:///{paths.root / 'mlflow.db'}"
        train_flow(paths, SMALL)
        rows = issue_flow(paths, SMALL, customers=list(CUSTOMERS))
        yield Issued(paths, uri, rows, str(prefect.settings.PREFECT_API_URL.value() or ""))


def _trace(issued: Issued, model: str) -> dict:
    from flows.trace import trace_flow

    return trace_flow(issued.paths, SMALL, model)


def _accused(report: dict) -> list[str]:
    return [a["customer_id"] for a in report["accused"]]


# --------------------------------------------------------------------------- issuing


def test_both_copies_carry_their_word_without_errors(issued):
    assert [r["customer_id"] for r in issued.rows] == CUSTOMERS
    for row in issued.rows:
        assert row["ber"] == 0.0
        assert row["min_margin"] >= SMALL.fingerprint.embed.margin
        assert Path(row["path"]) == issued.delivered(row["customer_id"])
        assert Path(row["path"]).is_file()


def test_ledger_records_both_customers_as_issued(issued):
    vendor = issued.vendor()
    records = {r.customer_id: r for r in vendor.ledger.records()}
    assert set(records) == set(CUSTOMERS)
    assert all(r.status == ISSUED for r in records.values())
    assert all(r.key_id == vendor.key.key_id for r in records.values())
    indices = [records[c].codeword_index for c in CUSTOMERS]
    assert len(set(indices)) == 2
    words = [vendor.codebook.word(i) for i in indices]
    assert not np.array_equal(*words)
    for row in issued.rows:
        assert records[row["customer_id"]].model_version == row["model_version"]
    assert (issued.paths.root / "vendor" / "ledger.sqlite").is_file()


def test_registered_copy_round_trips_and_is_tagged(issued):
    client = issued.client()
    registered = load_registered("models:/securemark-customer@customer-alice")
    delivered = load_file(str(issued.delivered("alice")))
    state = registered.state_dict()
    assert state.keys() == delivered.keys()
    for name, tensor in delivered.items():
        assert torch.equal(state[name], tensor), name

    version = client.get_model_version_by_alias(CUSTOMER_MODEL, "customer-alice")
    record = issued.vendor().ledger.get("alice")
    assert version.tags["customer_id"] == "alice"
    assert version.tags["codeword_index"] == str(record.codeword_index)
    assert version.tags["key_id"] == issued.vendor().key.key_id
    assert str(version.version) == record.model_version
    assert version.tags["weights_sha256"] == record.weights_sha256


def test_code_words_are_logged_to_the_vendor_only_experiment(issued):
    from flows.adapters.tracking import VENDOR_EXPERIMENT

    client = issued.client()
    vendor = issued.vendor()
    experiment = client.get_experiment_by_name(VENDOR_EXPERIMENT)
    first = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])[0]  # the fixture's batch: one run
    assert first.info.status == "FINISHED"
    assert {Path(f.path).name for f in client.list_artifacts(first.info.run_id, "codewords")} == {f"{c}.json" for c in CUSTOMERS}
    folder = issued.paths.mlruns / VENDOR_EXPERIMENT
    assert folder.stat().st_mode & 0o077 == 0  # only the vendor may enter it
    for customer in CUSTOMERS:
        record = vendor.ledger.get(customer)
        logged = json.loads(Path(client.download_artifacts(first.info.run_id, f"codewords/{customer}.json")).read_text())
        assert logged["bits"] == "".join(map(str, vendor.codebook.word(record.codeword_index).tolist()))
        assert logged["codeword_index"] == record.codeword_index and logged["key_id"] == vendor.key.key_id
        version = client.get_model_version_by_alias(CUSTOMER_MODEL, f"customer-{customer}")
        model_files = client.list_artifacts(version.run_id, "model")
        assert "codewords" not in {Path(f.path).parts[0] for f in client.list_artifacts(version.run_id)}
        assert any(f.path.endswith("MLmodel") for f in model_files)
        run_tags = client.get_run(version.run_id).data.tags
        assert run_tags["customer_id"] == customer and "mlflow.user" in run_tags and "mlflow.source.type" in run_tags  # as start_run tags them


def test_delivered_file_holds_weights_only(issued):
    vendor = issued.vendor()
    secret_path = issued.paths.secret_file(SMALL.vendor.secret_file)
    secret_hex = secret_path.read_text().strip()
    assert bytes.fromhex(secret_hex) == vendor.secret
    spec = SMALL.model
    for customer in CUSTOMERS:
        path = issued.delivered(customer)
        data = path.read_bytes()
        assert secret_hex.encode() not in data and secret_hex.upper().encode() not in data
        assert vendor.secret not in data
        bits = vendor.codebook.word(vendor.ledger.get(customer).codeword_index)
        assert "".join(map(str, bits.tolist())).encode() not in data
        assert np.packbits(bits, bitorder="little").tobytes() not in data
        K = vendor.key_matrix
        for row in (K[0], K[len(K) // 2], K[-1]):
            assert row.numpy().tobytes()[:256] not in data
        with safe_open(str(path), framework="pt") as f:
            assert set(f.keys()) == set(SplitNet(spec).state_dict().keys())
            assert set(f.metadata()) == {SPEC_KEY}


def test_the_persisted_key_is_the_secret_s_key_and_private(issued):
    vendor = issued.vendor()
    (path,) = sorted(vendor.files.state_dir.glob("key-*.safetensors"))
    assert path.stat().st_mode & 0o077 == 0
    assert torch.equal(vendor.key_matrix, vendor.key.matrix(vendor.secret))
    path.unlink()  # a new file (a process may still map the old one)
    path.write_bytes(b"damaged")  # a damaged file is drawn again, never read as a key
    assert torch.equal(issued.vendor().key_matrix, vendor.key.matrix(vendor.secret))


def test_issuing_again_returns_the_same_word_and_registers_nothing_new(issued):
    from flows.issue import issue_flow
    from securemark.weights import sha256_file

    client = issued.client()
    query = f"name='{CUSTOMER_MODEL}' and tags.customer_id='alice'"
    before = client.search_model_versions(query)
    index = issued.vendor().ledger.get("alice").codeword_index
    assert issue_flow(issued.paths, SMALL, customers=["alice"]) == []  # issued, copy intact: nothing to do
    copy = issued.delivered("alice")
    sha = sha256_file(copy)
    copy.unlink()  # a lost deliverable is issued again, alone this time (it was embedded in a batch with bob)
    (row,) = issue_flow(issued.paths, SMALL, customers=["alice"])  # `issued` keeps the env set
    after = client.search_model_versions(query)
    record = issued.vendor().ledger.get("alice")
    assert record.codeword_index == index and record.status == ISSUED
    assert len(issued.vendor().ledger) == 2
    hashes = [v.tags.get("weights_sha256") for v in after]
    assert len(hashes) == len(set(hashes)), hashes  # no copy registered twice
    assert row["ber"] == 0.0
    # the embedding is seeded from the secret and the customer, and a customer's copy does
    # not depend on who shared its batch: the same bytes, so the same registered version
    assert sha256_file(copy) == sha
    assert row["model_version"] == issued.rows[0]["model_version"] == record.model_version
    assert sorted(v.version for v in after) == sorted(v.version for v in before)


# --------------------------------------------------------------------------- tracing


def _assert_trace_run(issued: Issued, report: dict) -> None:
    client = issued.client()
    run = client.get_run(report["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == TRACE_EXPERIMENT
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"trace_report.json", "trace_report.md", "scores.png"} <= artifacts
    assert run.data.metrics["accused"] == len(report["accused"])


@pytest.fixture(scope="module")
def traces(issued):
    """Reports of alice's registered copy, bob's delivered file and the base model."""
    return {
        "alice": _trace(issued, "models:/securemark-customer@customer-alice"),
        "bob": _trace(issued, str(issued.delivered("bob"))),
        "base": _trace(issued, str(issued.paths.base_model)),
    }


def test_trace_of_registered_copy_accuses_exactly_alice(issued, traces):
    report = traces["alice"]
    assert _accused(report) == ["alice"]
    assert report["accused"][0]["codeword_index"] == issued.vendor().ledger.get("alice").codeword_index
    assert report["accused"][0]["family_p"] <= SMALL.trace.epsilon
    assert report["key_id"] == issued.vendor().key.key_id
    _assert_trace_run(issued, report)


def test_trace_of_delivered_file_accuses_exactly_bob(issued, traces):
    assert _accused(traces["bob"]) == ["bob"]
    _assert_trace_run(issued, traces["bob"])


def test_trace_of_base_model_accuses_no_one(issued, traces):
    report = traces["base"]
    assert report["accused"] == []
    assert all(a["score"] < report["threshold"] for a in report["top_innocent_scores"])
    _assert_trace_run(issued, report)


def test_each_trace_is_its_own_run(traces):
    assert len({r["mlflow_run_id"] for r in traces.values()}) == 3


# --------------------------------------------------------------------------- command line


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli(issued: Issued, model: str, served: bool = True, *flags: str) -> subprocess.CompletedProcess:
    """``securemark trace --json``: as a Prefect flow on the harness server (``served``),
    or locally, with no Prefect server at all."""
    root = issued.paths.root
    env = {**os.environ, "SECUREMARK_ROOT": str(root), "MLFLOW_TRACKING_URI": issued.uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for var in ("SECUREMARK_SECRET_FILE", "SECUREMARK_VENDOR_DIR", "PREFECT_API_URL"):
        env.pop(var, None)
    if served and issued.prefect_api_url:  # reuse the harness server instead of starting another
        env["PREFECT_API_URL"] = issued.prefect_api_url
    return subprocess.run([sys.executable, "-m", "flows.entry.cli", "trace", "--model", model, "--json", *flags],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_cli_trace_of_alice_exits_10_with_json_naming_her(issued):
    proc = _cli(issued, str(issued.delivered("alice")))
    assert proc.returncode == 10, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert _accused(report) == ["alice"]
    assert report["model"] == str(issued.delivered("alice"))


def test_local_trace_needs_no_prefect_server_and_still_logs_to_mlflow(issued):
    """Outside a flow the command answers first; its MLflow run is written from the outbox
    by a background process (flows.adapters.trace_log), and then it is all there."""
    proc = _cli(issued, str(issued.delivered("bob")), served=False)
    assert proc.returncode == 10, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert _accused(report) == ["bob"]
    queued = Path(report["mlflow_queued"])
    pending = lambda: queued.exists() or any(queued.parent.glob(queued.name + ".claimed-*"))  # noqa: E731  (queued, or being logged)
    deadline = time.monotonic() + 180
    while pending() and time.monotonic() < deadline:
        time.sleep(1)
    assert not pending(), (queued.parent / "drain.log").read_text()[-2000:]
    (run,) = issued.client().search_runs([issued.client().get_experiment_by_name(TRACE_EXPERIMENT).experiment_id],
                                         f"tags.trace_id = '{report['trace_id']}'")
    _assert_trace_run(issued, {**report, "mlflow_run_id": run.info.run_id})
    assert report["model_sha256"] == __import__("hashlib").sha256(issued.delivered("bob").read_bytes()).hexdigest()
    assert report["codewords_assigned"] == 2 and report["customers_scored"] == SMALL.fingerprint.code.capacity
    # words of no customer are reported as unassigned; alice (innocent here) by name
    assert all((r["customer_id"] is None) == (not r["assigned"]) for r in report["top_innocent_scores"])
    assert {r["customer_id"] for r in report["top_innocent_scores"]} <= {None, "alice"}


def test_cli_trace_of_malicious_pickle_exits_2_and_runs_nothing(issued, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil(marker)))
    proc = _cli(issued, str(evil))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert sum(line.startswith("securemark:") for line in proc.stderr.splitlines()) == 1
    assert "evil.pt" in proc.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------- degenerate models


def _degenerate(issued: Issued, tmp_path: Path, name: str, change) -> Path:
    from safetensors.torch import save_file

    state = load_file(str(issued.delivered("alice")))
    path = tmp_path / f"{name}.safetensors"
    save_file({k: change(k, v).contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "name, change, says",
    [
        ("all-zero", lambda k, v: torch.zeros_like(v), "same output"),
        ("carrier-zero", lambda k, v: torch.zeros_like(v) if k == SMALL.fingerprint.embed.layer else v, "all zeros"),
        ("times-1e30", lambda k, v: v * 1e30 if v.is_floating_point() and "running" not in k else v, ""),
        ("times-1e-40", lambda k, v: v * 1e-40 if v.is_floating_point() and "running" not in k else v, ""),
    ],
)
def test_degenerate_weights_are_a_verdict_not_a_crash(issued, tmp_path, name, change, says):
    from flows.entry.cli import exit_code
    from flows.tracing import trace_model

    suspect = str(_degenerate(issued, tmp_path, name, change))
    if name == "all-zero":  # the command, once (locally: a flow run adds ~5 s, not coverage); the others in this process
        proc = _cli(issued, suspect, False, "--log-now")
        assert proc.returncode in (0, 10, 11), proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        report, code = json.loads(proc.stdout), proc.returncode
        assert code == exit_code(report)
    else:
        report = trace_model(issued.paths, SMALL, suspect)
        code = exit_code(report)
    assert _accused(report) in ([], ["alice"])  # never an innocent
    if code == 10:
        assert _accused(report) == ["alice"]
    assert says in report["note"]
    degenerate = any(why in report["note"] for why in ("NaN or Inf", "same output", "all zeros"))  # securemark.tracing.degeneracy
    assert degenerate or not says
    if not report["accused"]:  # nothing could be read: the absence of a name says nothing
        assert (code == 11) is degenerate and report["inconclusive"] is degenerate
        assert report["inconclusive_reason"] == ("degenerate" if degenerate else "")


# --------------------------------------------------------------------------- obfuscated models


def _obfuscated(issued: Issued, tmp_path: Path, scale: float) -> Path:
    """Alice's copy with noise of ``scale`` x the carrying layer's norm in the directions the
    attacker's data barely excites (the attack aimed at the drift-whitened reading)."""
    from securemark.attacks import create_attack
    from securemark.attacks.base import AttackData
    from securemark.storage import read_partition
    from securemark.weights import load_weights, save_weights

    own = read_partition(issued.paths.partition("attacker"))
    carrier = SMALL.fingerprint.embed.layer.rsplit(".", 2)[0]  # the fingerprinted block, e.g. server.dense2
    noise = create_attack("obfuscate", layers=[carrier], directions=64, scale=scale, samples=len(own.labels))
    model = noise([load_weights(issued.delivered("alice"))], AttackData(own.as_float(), own.labels), torch.Generator().manual_seed(0))
    return save_weights(model, tmp_path / f"obfuscated-{scale:g}.safetensors")


def test_an_obfuscated_copy_is_flagged_and_inconclusive_when_no_one_is_named(issued, tmp_path):
    limit = SMALL.trace.off_data_limit
    path = str(_obfuscated(issued, tmp_path, 3.0))
    traced = _cli(issued, path, False)
    assert traced.returncode in (10, 11), traced.stdout[-2000:] + traced.stderr[-3000:]
    report = json.loads(traced.stdout)
    assert report["off_data_ratio"] > limit and report["obfuscated"] is True and "obfuscated" in report["note"]
    assert _accused(report) in ([], ["alice"]) and report["inconclusive"] is (traced.returncode == 11)
    # the same model where the bound asks for more evidence than any mark gives: no one can be named,
    # and the verdict says the absence of a name means nothing here
    strict = _cli(issued, path, False, "--epsilon", "1e-300")
    assert strict.returncode == 11, strict.stdout[-2000:] + strict.stderr[-3000:]
    report = json.loads(strict.stdout)
    assert report["accused"] == [] and report["inconclusive"] is True
    base = _cli(issued, str(issued.paths.base_model), False, "--epsilon", "1e-300")
    assert base.returncode == 0, base.stdout[-2000:] + base.stderr[-3000:]  # an untouched model: plainly no one
    report = json.loads(base.stdout)
    assert report["off_data_ratio"] == pytest.approx(1.0, abs=1e-3) and report["inconclusive"] is report["obfuscated"] is False
