"""``make serve``: serve SecureMark's deployments against a Prefect server.

    python -m flows.entry.serve [--start-server] [--port 4200]

Deployments (flow/deployment names as in the Prefect UI):

- ``issue-fingerprint/issue-fingerprint``: on demand, parameter ``customers``;
- ``trace-suspicious-model/trace-suspicious-model``: on demand, parameter ``model``;
- ``robustness-audit/robustness-audit``: on the cron schedule ``ops.audit_cron``;
- ``retrain/retrain``: on demand, parameter ``variant``.

The server is the one ``PREFECT_API_URL`` names; with ``--start-server`` and no server
answering there, ``prefect server start`` is run on 127.0.0.1 for as long as this
process lives. Runs execute in subprocesses of this process, in the project root.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from flows.adapters.paths import Paths
from flows.adapters.servers import HOST, healthy, prefect_server
from flows.adapters.settings import Settings
from flows.adapters.stage import exit_invalid
from securemark.errors import SecureMarkError, ServerFailed

DEPLOYMENTS = ("issue-fingerprint", "trace-suspicious-model", "robustness-audit", "retrain")


def deployments(settings: Settings) -> list:
    from flows.entry.ops import issue_fingerprint, retrain, robustness_audit, trace_suspicious_model

    cron = settings.ops.audit_cron or None
    tags = ["securemark"]
    return [
        issue_fingerprint.to_deployment(name="issue-fingerprint", tags=tags, description="Issue fingerprinted copies to customers."),
        trace_suspicious_model.to_deployment(name="trace-suspicious-model", tags=tags, description="Trace a suspicious model (path or models:/ URI)."),
        robustness_audit.to_deployment(name="robustness-audit", tags=tags, cron=cron, description=f"Attack grid vs the registry's copies ({cron})."),
        retrain.to_deployment(name="retrain", tags=tags, description="Split training of the base model."),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="serve SecureMark's Prefect deployments")
    ap.add_argument("--start-server", action="store_true", help="start `prefect server start` when none answers at PREFECT_API_URL")
    ap.add_argument("--port", type=int, default=4200, help="port of the server started with --start-server")
    args = ap.parse_args(argv)
    try:
        sys.exit(_serve(args))
    except SecureMarkError as exc:  # bad params, a server that will not start: one line, exit 2
        exit_invalid(exc)


def _serve(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
    os.chdir(paths.root)
    settings = Settings.load(paths.params)
    from prefect import serve

    api = os.environ.get("PREFECT_API_URL")
    if api and healthy(api.rstrip("/") + "/health"):
        serve(*deployments(settings))
        return 0
    if not args.start_server:
        raise ServerFailed(f"no Prefect server answers at PREFECT_API_URL={api!r}; start one (`prefect server start`) or pass --start-server")
    # Prefect reads PREFECT_API_URL when it is imported: serve from a child process that
    # starts with the new server's URL in its environment. SIGTERM unwinds like Ctrl-C,
    # so the child and the server are always stopped with this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = 0
    with prefect_server(args.port, paths.root / ".prefect") as url:
        print(f"Prefect server: http://{HOST}:{args.port} (UI), API {url}", flush=True)
        child = subprocess.Popen([sys.executable, "-m", "flows.entry.serve"], env={**os.environ, "PREFECT_API_URL": url})
        try:
            code = child.wait()
        except KeyboardInterrupt:
            pass
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait(timeout=30)
    return code


if __name__ == "__main__":
    main()
