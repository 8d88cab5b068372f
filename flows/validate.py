"""``validate`` stage: Great Expectations suites over every partition and their union.

Writes the full validation result to ``reports/validation.json`` (pass or fail), logs
it to MLflow, and fails the stage, naming partition, expectation and offending rows,
when any expectation fails.
"""

from __future__ import annotations

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import tracking
from flows.entry import stage_main
from flows.project import Paths, build
from securemark.errors import ValidationFailed
from securemark.partition import PartitionSpec
from securemark.storage import read_manifest, read_tensors
from securemark.validation import ValidationSpec, validate_partitions

REPORT_FILE = "validation.json"


def validation_spec(params: dict) -> ValidationSpec:
    spec = build(PartitionSpec, params, "prepare")
    tolerance = float(params.get("validate", {}).get("class_share_tolerance", 0.25))
    return ValidationSpec(
        expected_rows={name: spec.size_of(name) for name in spec.names},
        iid=spec.mode == "iid",
        class_share_tolerance=tolerance,
    )


@task(name="run-expectation-suites", cache_policy=NO_CACHE)  # no retries: a failed validation is final
def run_suites(paths: Paths, spec: ValidationSpec):
    manifests, tensors = {}, {}
    present = sorted(p.name for p in paths.partitions.iterdir() if p.is_dir()) if paths.partitions.is_dir() else []
    for name in present:
        manifests[name] = read_manifest(paths.partition(name))
        t = read_tensors(paths.partition(name))
        tensors[name] = (t["images"], t["labels"])
    return validate_partitions(manifests, tensors, spec)


@flow(name="validate-partitions")
def validate_flow(paths: Paths, params: dict) -> bool:
    logger = get_run_logger()
    spec = validation_spec(params)
    with tracking.run("validate", tracking.DATA_EXPERIMENT, paths, tags={"stage": "validate"}):
        report = run_suites(paths, spec)
        document = {"success": report.success, "failures": report.failures, "results": report.results}
        out = paths.reports / REPORT_FILE
        tracking.write_json(document, out)
        mlflow.log_artifact(str(out))
        mlflow.log_metrics({"validation.success": float(report.success), "validation.failures": len(report.failures)})
        mlflow.log_param("validate.class_share_tolerance", spec.class_share_tolerance)
    if not report.success:
        raise ValidationFailed(f"partition validation failed (full result: {out})\n{report.summary()}", report.failures)
    logger.info(report.summary())
    return True


def main() -> None:
    stage_main(lambda paths, params: validate_flow(paths, params))


if __name__ == "__main__":
    main()
