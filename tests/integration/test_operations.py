"""Operations end to end: Dask fan-out, a real Prefect server serving the deployments
(a trace triggered through the API, its artifacts read back), a real MLflow server
answering registry lookups over HTTP, and the audit comparison."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import yaml

from flows.adapters.paths import Paths
from flows.adapters.servers import free_port, mlflow_server, prefect_server
from flows.adapters.settings import Settings
from flows.adapters.tracking import write_json
from tests.conftest import PROJECT_ENV_VARS, SMALL, isolated_copy, small_params

pytestmark = pytest.mark.integration

CUSTOMERS = ["op-alice", "op-bob"]


@contextmanager
def operated_project(prepared, root, settings: Settings = SMALL, customers: list[str] = CUSTOMERS):
    """A private copy of the prepared project with a trained base model and ``customers``
    issued; MLflow on its own SQLite file while the block runs."""
    import prefect.settings

    from flows.issue import run_issue
    from flows.train import train_flow

    with isolated_copy(prepared, root) as (paths, mp):
        train_flow(paths, settings)
        if customers:
            run_issue(paths, settings, customers)
        mp.setenv("PREFECT_API_URL", str(prefect.settings.PREFECT_API_URL.value()))  # for child processes
        yield paths, mp


@pytest.fixture(scope="module")
def ops_project(prepared_project, prefect_harness, tmp_path_factory):
    """Two issued copies, shared by the tests of this module that only read it."""
    with operated_project(prepared_project, tmp_path_factory.mktemp("ops") / "project") as (paths, _):
        yield paths


def child_env(paths: Paths, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SECUREMARK_ROOT": str(paths.root), "MLFLOW_TRACKING_URI": f"sqlite:///{paths.root / 'mlflow.db'}", **extra}
    for var in PROJECT_ENV_VARS:
        if var != "SECUREMARK_ROOT":
            env.pop(var, None)
    return env


def test_issuing_fans_out_on_a_dask_cluster(prepared_project, prefect_harness, tmp_path):
    from distributed import Client, LocalCluster

    from flows.issue import run_issue

    with operated_project(prepared_project, tmp_path / "project", customers=[]) as (paths, mp), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        worker_pids = {str(pid) for pid in client.run(os.getpid).values()}
        mp.setenv("SECUREMARK_DASK_ADDRESS", cluster.scheduler_address)
        rows = run_issue(paths, SMALL, ["dask-1", "dask-2", "dask-3"])
    assert [r["customer_id"] for r in rows] == ["dask-1", "dask-2", "dask-3"]
    ran_on = {r["worker"].rsplit(":", 1)[1] for r in rows}
    assert ran_on <= worker_pids and str(os.getpid()) not in ran_on
    assert all(r["ber"] == 0.0 for r in rows)
    for r in rows:
        assert paths.customer_copy(r["customer_id"]).is_file()


def test_a_failed_issue_keeps_the_words_and_a_rerun_issues_exactly_the_missing_copies(prepared_project, prefect_harness, tmp_path):
    from flows.adapters.vendor import open_vendor
    from flows.issue import IssuingFailed, run_issue
    from securemark.ledger import ISSUED, PENDING
    from securemark.weights import sha256_file

    starved = Settings.from_params(small_params(fingerprint={"max_steps": 1}))  # an injected failure: no step budget
    customers = ["rerun-a", "rerun-b"]
    with operated_project(prepared_project, tmp_path / "project", customers=[]) as (paths, _):
        with pytest.raises(IssuingFailed) as failed:
            run_issue(paths, starved, customers)
        message = str(failed.value)
        assert all(c in message for c in customers) and "min margin" in message and "re-run" in message
        ledger = open_vendor(paths, SMALL).ledger
        reserved = {r.customer_id: r for r in ledger.records()}
        assert {c: reserved[c].status for c in customers} == {c: PENDING for c in customers}
        assert not any(paths.customer_copy(c).exists() for c in customers)

        rows = run_issue(paths, SMALL, customers)  # the re-run: the same words, now delivered
        assert [r["customer_id"] for r in rows] == customers
        after = {r.customer_id: r for r in ledger.records()}
        assert {c: after[c].codeword_index for c in customers} == {c: reserved[c].codeword_index for c in customers}
        assert all(after[c].status == ISSUED for c in customers) and len(ledger) == 2
        kept = sha256_file(paths.customer_copy("rerun-b"))

        paths.customer_copy("rerun-a").unlink()  # a lost deliverable
        rows = run_issue(paths, SMALL, customers)
        assert [r["customer_id"] for r in rows] == ["rerun-a"]  # only the missing copy, with its own word
        final = {r.customer_id: r for r in ledger.records()}
        assert final["rerun-a"].codeword_index == reserved["rerun-a"].codeword_index and len(ledger) == 2
        assert sha256_file(paths.customer_copy("rerun-b")) == kept and final["rerun-b"] == after["rerun-b"]
        assert run_issue(paths, SMALL, customers) == []  # nothing missing: nothing issued


def _wait_for_deployment(client, name: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.read_deployment_by_name(name)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_served_trace_deployment_publishes_its_verdict(ops_project, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    with prefect_server(port, tmp_path / "prefect-home") as api:
        log = open(tmp_path / "serve.log", "wb")
        serve = subprocess.Popen([sys.executable, "-m", "flows.entry.serve"], cwd=ops_project.root, stdout=log, stderr=subprocess.STDOUT,
                                 env=child_env(ops_project, PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-home")))
        try:
            with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
                for name in ("issue-fingerprint", "trace-suspicious-model", "robustness-audit", "retrain"):
                    deployment = _wait_for_deployment(client, f"{name}/{name}")
                assert deployment.name == "retrain"
                audit = client.read_deployment_by_name("robustness-audit/robustness-audit")
                assert audit.schedules  # the nightly cron (ops.audit_cron default) is registered

                copy = ops_project.customer_copy("op-alice")
                run = run_deployment("trace-suspicious-model/trace-suspicious-model", parameters={"model": str(copy)},
                                     timeout=300, poll_interval=2)
                assert run.state is not None and run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])

                def artifact(key: str):
                    found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
                    assert found, f"no artifact {key!r}"
                    return found[-1]

                verdict = artifact("trace-verdict")
                assert "op-alice" in verdict.data and "threshold" in verdict.data and "sha256" in verdict.data
                scores = artifact("trace-scores")
                assert "op-alice" in str(scores.data)
                assert "/#/experiments/" in str(artifact("trace-mlflow-run").data)
        finally:
            serve.terminate()
            serve.wait(timeout=30)
            log.close()


def test_registry_lookups_over_an_mlflow_server(ops_project, tmp_path, monkeypatch, capsys):
    from flows.entry import cli

    port = free_port()
    root = ops_project.root
    with mlflow_server(port, f"sqlite:///{root / 'mlflow.db'}", root / "mlruns", log=tmp_path / "mlflow.log") as url:
        env = child_env(ops_project, MLFLOW_TRACKING_URI=url)
        for var in ("SECUREMARK_ROOT", "MLFLOW_TRACKING_URI"):  # `securemark registry list --json` in this process (the trace below is a command)
            monkeypatch.setenv(var, env[var])
        store = mlflow.get_tracking_uri()
        try:
            with pytest.raises(SystemExit) as listed:
                cli.main(["registry", "list", "--json"])
        finally:
            mlflow.set_tracking_uri(store)  # not the server's, which stops with this block
        assert listed.value.code == 0
        rows = {r["customer_id"]: r for r in json.loads(capsys.readouterr().out)}
        assert set(CUSTOMERS) <= set(rows)
        for customer in CUSTOMERS:
            assert rows[customer]["model_version"] and rows[customer]["in_sync"] and rows[customer]["issued_at"]

        traced = subprocess.run([sys.executable, "-m", "flows.entry.cli", "trace", "--model", "models:/securemark-customer@customer-op-bob", "--json"],
                                cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert traced.returncode == 10, traced.stderr[-3000:]
        report = json.loads(traced.stdout[traced.stdout.index("{"):])
        assert [a["customer_id"] for a in report["accused"]] == ["op-bob"]
        assert report["mlflow_run_url"].startswith(url)


def _securemark_temp_folders() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("securemark-*")}


def test_registry_downloads_leave_no_temporary_folders(ops_project, tmp_path):
    from flows.adapters.model_registry import load_registered

    before = _securemark_temp_folders()
    model = load_registered("models:/securemark-customer@customer-op-alice")
    env = child_env(ops_project)
    env.pop("PREFECT_API_URL", None)
    traced = subprocess.run([sys.executable, "-m", "flows.entry.cli", "trace", "--model", "models:/securemark-customer@customer-op-bob", "--json"],
                            cwd=ops_project.root, env=env, capture_output=True, text=True, timeout=300)
    assert traced.returncode == 10, traced.stderr[-3000:]
    assert model is not None and _securemark_temp_folders() <= before


def test_robustness_audit_runs_against_the_registry_and_compares(prepared_project, prefect_harness, tmp_path):
    from flows.attacker_baseline import attacker_baseline_flow
    from flows.entry.ops import robustness_audit

    # the audit runs the `full` profile's grid, not the default one
    params = small_params(attack={"grid": [{"attack": "prune", "rate": 0.3}]},
                          profiles={"full": {"attack": {"grid": [{"attack": "quantize", "bits": 8}, {"attack": "permute"}]}}})
    with operated_project(prepared_project, tmp_path / "project", Settings.from_params(params)) as (paths, mp):
        (paths.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))  # this project's own params
        mp.setenv("SECUREMARK_ROOT", str(paths.root))
        write_json(attacker_baseline_flow(paths, Settings.from_params(params)), paths.attacker_baseline)  # attacks are judged against it
        first = robustness_audit()
        second = robustness_audit()
    assert {r["status"] for r in first["comparison"]} == {"new"}
    assert {t["attack"] for t in first["summary"]["tradeoff"]} == {"quantize", "permute"}
    assert first["summary"]["innocents_accused_total"] == 0
    assert all(t["traced_fraction_overall"] == 1.0 for t in first["summary"]["tradeoff"])
    assert {r["status"] for r in second["comparison"]} == {"same"}


def test_serve_without_a_server_says_how_to_start_one(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api", "SECUREMARK_ROOT": str(tmp_path)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params()))
    done = subprocess.run([sys.executable, "-m", "flows.entry.serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no Prefect server answers" in done.stderr and "--start-server" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_serve_with_bad_params_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "SECUREMARK_ROOT": str(tmp_path)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params(base={"seed": "not a number"})))
    done = subprocess.run([sys.executable, "-m", "flows.entry.serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "base" in done.stderr and "seed" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_server_that_cannot_start_is_a_project_error(tmp_path):
    from flows.adapters.servers import prefect_server
    from securemark.errors import SecureMarkError, ServerFailed

    with socket.socket() as taken:  # the port is held: the server cannot bind it, exits, and says so
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerFailed) as failed:
            with prefect_server(port, tmp_path / ".prefect", timeout=60):
                pass
    assert isinstance(failed.value, SecureMarkError) and "log" in str(failed.value) and "\n" not in str(failed.value)


# ----------------------------------------------------------------------------- black-box tracing of prediction APIs
def _trace_endpoint(paths: Paths, url: str, *extra: str) -> subprocess.CompletedProcess:
    env = child_env(paths)
    env.pop("PREFECT_API_URL", None)  # traced directly, as a user's shell without a Prefect server would
    return subprocess.run([sys.executable, "-m", "flows.entry.cli", "trace", "--endpoint", url, "--json", *extra],
                          cwd=paths.root, env=env, capture_output=True, text=True, timeout=300)


def _report(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_a_served_copy_is_traced_through_its_api_and_the_base_is_not(ops_project):
    from flows.adapters.api_server import serve_predictions
    from securemark.weights import load_weights

    copy, base = load_weights(ops_project.customer_copy("op-alice")).eval(), load_weights(ops_project.base_model).eval()
    with serve_predictions(copy) as url:
        traced = _trace_endpoint(ops_project, url, "--log-now")  # the MLflow run written before the answer
    assert traced.returncode == 10, traced.stderr[-3000:]
    report = _report(traced)
    assert [a["customer_id"] for a in report["accused"]] == ["op-alice"]
    assert report["channel"] == "api" and 0 < report["queries"] <= SMALL.blackbox.keys and report["mlflow_run_id"]
    assert report["inconclusive"] is False and report["patterns_answered"] >= report["patterns_needed"]
    with serve_predictions(base) as url:
        clean = _trace_endpoint(ops_project, url)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert _report(clean)["accused"] == [] and _report(clean)["queries"] == SMALL.blackbox.keys  # no early stop without evidence
    assert _report(clean)["inconclusive"] is False  # read in full: the base plainly carries no one's word
    assert _report(clean)["mlflow_queued"] and "mlflow_run_id" not in _report(clean)  # by default: queued, written in the background


def test_a_read_too_short_to_accuse_is_inconclusive_and_no_budget_is_refused(ops_project):
    from flows.adapters.api_server import serve_predictions
    from securemark.weights import load_weights

    copy = load_weights(ops_project.customer_copy("op-alice")).eval()
    with serve_predictions(copy) as url:
        short = _trace_endpoint(ops_project, url, "--budget", "3")  # fewer patterns than any accusation needs
        assert short.returncode == 11, short.stderr[-3000:]
        report = _report(short)
        assert report["accused"] == [] and report["inconclusive"] is True and report["inconclusive_reason"] == "under-powered"
        assert report["queries"] == 3 and report["patterns_answered"] == 3 < report["patterns_needed"]
        assert "inconclusive" in report["note"]
    unreachable = _trace_endpoint(ops_project, "http://127.0.0.1:9/never-contacted", "--budget", "0")
    assert unreachable.returncode == 2 and "Traceback" not in unreachable.stderr and "--budget" in unreachable.stderr


def test_a_hostile_api_ends_the_trace_with_exit_2(ops_project):
    from tests.unit.test_endpoint import scripted_server, send

    with scripted_server(lambda h, body, calls: send(h, 200, b'{"labels": [99]}')) as (url, _):
        done = _trace_endpoint(ops_project, url + "/predict")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "securemark:" in done.stderr and "predictions for" in done.stderr


def test_a_copy_served_by_mlflow_models_serve_is_traced(ops_project, tmp_path):
    import urllib.request

    port = free_port()
    env = {**child_env(ops_project), "MLFLOW_TRACKING_URI": f"sqlite:///{ops_project.root / 'mlflow.db'}"}
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/securemark-customer@customer-op-bob",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  cwd=ops_project.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as ping:
                        if ping.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
            traced = _trace_endpoint(ops_project, f"http://127.0.0.1:{port}")  # the MLflow scoring protocol
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert traced.returncode == 10, traced.stderr[-3000:]
    assert [a["customer_id"] for a in _report(traced)["accused"]] == ["op-bob"]
