"""``validate`` stage: Great Expectations suites over every partition and their union.

Writes the full validation result to ``reports/validation.json`` (pass or fail), logs
it to MLflow, and fails the stage, naming partition, expectation and offending rows,
when any expectation fails.
"""

from __future__ import annotations

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.adapters import tracking
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.stage import stage_main
from securemark.errors import ValidationFailed
from securemark.storage import read_manifest, read_tensors
from securemark.validation import ValidationSpec, validate_partitions


def validation_spec(settings: Settings) -> ValidationSpec:
    spec = settings.prepare
    return ValidationSpec(
        expected_rows={name: spec.size_of(name) for name in spec.names},
        iid=spec.mode == "iid",
        class_share_tolerance=settings.validate.class_share_tolerance,
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


@flow(name="validate-partitions", validate_parameters=False)
def validate_flow(paths: Paths, settings: Settings) -> bool:
    logger = get_run_logger()
    spec = validation_spec(settings)
    with tracking.run("validate", tracking.DATA_EXPERIMENT, paths, tags={"stage": "validate"}):
        report = run_suites(paths, spec)
        document = {"success": report.success, "failures": report.failures, "results": report.results}
        out = paths.validation_report
        tracking.write_json(document, out)
        mlflow.log_artifact(str(out))
        mlflow.log_metrics({"validation.success": float(report.success), "validation.failures": len(report.failures)})
        mlflow.log_param("validate.class_share_tolerance", spec.class_share_tolerance)
    if not report.success:
        raise ValidationFailed(f"partition validation failed (full result: {out})\n{report.summary()}", report.failures)
    logger.info(report.summary())
    return True


def main() -> None:
    stage_main(validate_flow)


if __name__ == "__main__":
    main()
