"""The ``securemark`` command: a thin layer over the flows.

    securemark issue --customer ID [--customer ID ...]
    securemark trace --model PATH|models:/NAME@ALIAS [--json] [--epsilon E] [--scorer S] [--log-now]
    securemark trace --endpoint URL [--budget N] [--protocol auto|mlflow|json] [--json] [--epsilon E] [--log-now]
    securemark registry list [--json]

Exit codes: 0 success (``trace``: no one accused), 10 someone accused, 11 inconclusive (no one
accused, and that says nothing: the model was obfuscated where data does not look, nothing
could be read from it, or an API read too short to accuse even an unmodified copy), 2 invalid input
or configuration (unreadable, non-model or malformed file, unknown registry model, bad
params or flags: one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from typing import TYPE_CHECKING

from flows.adapters.logs import quiet_expected_errors
from flows.adapters.paths import Paths
from securemark.errors import InvalidInput, SecureMarkError

if TYPE_CHECKING:  # imported when a command runs: `securemark --help` must not load torch
    from flows.adapters.settings import Settings

EXIT_NONE_ACCUSED = 0
EXIT_ACCUSED = 10
EXIT_INCONCLUSIVE = 11  # no one accused, and that says nothing: the model was obfuscated where data does not look
#                        (tracing/tamper.py), nothing could be read from it (degenerate), or an API read was too short
#                        to accuse even an unmodified copy (securemark.tracing.blackbox.patterns_needed)
EXIT_INVALID = 2  # the stages' exit code for invalid input (flows.adapters.stage.EXIT_INVALID)


def _issue(args, paths: Paths, settings: Settings) -> int:
    from flows.issue import run_issue

    quiet_expected_errors()
    rows = run_issue(paths, settings, customers=args.customer)
    for row in rows:
        print(f"{row['customer_id']}: {row['path']}  (registry version {row['model_version']}, BER {row['ber']:.3f}, accuracy {row['test_accuracy']:.4f})")
    return 0


def _trace(args, paths: Paths, settings: Settings) -> int:
    """Trace a model: as a Prefect flow when a Prefect server is configured
    (``PREFECT_API_URL``: the verdict is also published as artifacts), else directly,
    without starting a temporary Prefect server; the MLflow run is then written by a
    background process after the verdict is printed (``--log-now``: before)."""
    if args.budget is not None and args.budget < 1:  # before any import or query: nothing to read
        raise InvalidInput(f"--budget must be at least 1 query, got {args.budget}")
    from flows.adapters.reports import trace_markdown
    from flows.tracing import trace_endpoint, trace_model

    trace = settings.trace.with_overrides(epsilon=args.epsilon, scorer=args.scorer)  # bad flags: exit 2 before any work
    in_flow = bool(os.environ.get("PREFECT_API_URL"))
    if in_flow:  # Prefect is imported only here: a plain trace does not pay for it
        from flows.trace import trace_endpoint_flow, trace_flow

        quiet_expected_errors()
    log = "now" if args.log_now else "queue"  # queue: the verdict first, its MLflow run written in the background
    if args.endpoint:
        if in_flow:
            report = trace_endpoint_flow(paths, settings, args.endpoint, args.budget, args.protocol, trace)
        else:
            report = trace_endpoint(paths, settings, args.endpoint, args.budget, args.protocol, trace, log=log)
    else:
        report = trace_flow(paths, settings, args.model, trace) if in_flow else trace_model(paths, settings, args.model, trace, log=log)
    print(json.dumps(report, indent=2) if args.json else trace_markdown(report))
    return exit_code(report)


def exit_code(report: dict) -> int:
    """A trace report's exit code: 10 someone accused, 11 inconclusive, 0 no one accused."""
    if report["accused"]:
        return EXIT_ACCUSED
    return EXIT_INCONCLUSIVE if report.get("inconclusive") else EXIT_NONE_ACCUSED


def _registry_list(args, paths: Paths, settings: Settings) -> int:
    from flows.adapters import tracking
    from flows.adapters.model_registry import customer_table
    from flows.adapters.vendor import open_vendor

    tracking.configure(paths)
    vendor = open_vendor(paths, settings)
    rows = customer_table(vendor.ledger.records())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Customers ({len(rows)}; key {vendor.key.key_id})")
    for column in ("customer", "status", "model version", "key id", "issued at", "registry agrees"):
        table.add_column(column, no_wrap=True)
    for r in rows:
        table.add_row(r["customer_id"], r["status"], r["model_version"] or "-", r["key_id"], r["issued_at"] or "-", "yes" if r["in_sync"] else "NO")
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="securemark", description="Trace leaked classifiers back to the customers who leaked them.")
    sub = p.add_subparsers(dest="command", required=True)
    issue = sub.add_parser("issue", help="issue fingerprinted copies (weights only) to customers")
    issue.add_argument("--customer", action="append", required=True, help="customer id (repeat for a batch)")
    issue.set_defaults(run=_issue)
    trace = sub.add_parser("trace", help="trace a suspicious model; exit 0 none accused, 10 accused, 11 inconclusive (obfuscated, degenerate or under-powered read), 2 invalid input")
    suspect = trace.add_mutually_exclusive_group(required=True)
    suspect.add_argument("--model", help="safetensors / tensor-only state dict path, or models:/NAME@ALIAS (white-box)")
    suspect.add_argument("--endpoint", help="URL of a prediction API serving the suspect (black-box: queries the secret key images)")
    trace.add_argument("--budget", type=int, default=None, help="most key images to query, at least 1 (--endpoint; default: params blackbox.max_queries); "
                       "a read too short to accuse an unmodified copy is inconclusive (exit 11)")
    trace.add_argument("--protocol", default="auto", choices=("auto", "mlflow", "json"), help="the API's request format (--endpoint)")
    trace.add_argument("--json", action="store_true", help="print the report as JSON")
    trace.add_argument("--epsilon", type=float, default=None, help="whole-trace false-accusation probability (default: params)")
    trace.add_argument("--scorer", default=None, help="correlation | tardos (default: params)")
    trace.add_argument("--log-now", action="store_true", help="write the trace's MLflow run before answering (default: the verdict first, "
                       "the run written by a background process from the outbox .securemark-outbox/; inside a Prefect flow always now)")
    trace.set_defaults(run=_trace)
    registry = sub.add_parser("registry", help="the model registry joined with the customer ledger")
    registry_sub = registry.add_subparsers(dest="registry_command", required=True)
    listing = registry_sub.add_parser("list", help="customers with model version, key id and issue time")
    listing.add_argument("--json", action="store_true", help="print the rows as JSON")
    listing.set_defaults(run=_registry_list)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    paths = Paths.from_env()
    try:
        from flows.adapters.settings import Settings

        code = args.run(args, paths, Settings.load(paths.params))
    except SecureMarkError as exc:
        sys.stderr.write(f"securemark: {exc}\n")
        code = EXIT_INVALID
    if argv is None and args.command == "trace" and not args.log_now and not os.environ.get("PREFECT_API_URL"):
        # the verdict is printed and its MLflow run waits in the outbox for the background writer:
        # end without the interpreter's teardown (unloading torch is 0.3-0.4 s of a 3-s trace)
        from flows.adapters.stage import end_process  # imports the settings, loaded by now; --help never gets here

        end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
