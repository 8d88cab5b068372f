"""Great Expectations suites over the partitions.

Three kinds of batch are validated, each by its own suite:
- ``manifest``: every partition's manifest (schema, row count, unique ids, labels);
- ``images``: one row of statistics per image tensor (shape, dtype, value range, the
  label stored beside it agrees with the manifest);
- ``class_balance``: per-class shares, bounded for IID partitions;
- ``union``: all partitions together (no source image in two training partitions,
  sample ids unique across the dataset).

The functions are pure: data frames and tensors in, a :class:`ValidationReport` out.
Writing the report and failing the pipeline is the flow's job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
import torch

from securemark.partition import MANIFEST_COLUMNS, NUM_CLASSES, TEST_TOTAL, TRAIN_TOTAL

log = logging.getLogger(__name__)
EXAMPLE_ROWS = 5


@dataclass(frozen=True)
class ValidationSpec:
    """What the partitions must look like (derived from the ``prepare`` params)."""

    expected_rows: dict[str, int]
    iid: bool = True
    class_share_tolerance: float = 0.25  # relative to 1/NUM_CLASSES


@dataclass
class ValidationReport:
    success: bool
    failures: list[dict] = field(default_factory=list)
    results: dict[str, dict] = field(default_factory=dict)  # batch name -> GX result JSON

    def summary(self) -> str:
        if self.success:
            return f"all {len(self.results)} validation batches passed"
        lines = [f"{len(self.failures)} expectation(s) failed:"]
        for f in self.failures:
            where = f", e.g. rows {f['example_rows']}" if f["example_rows"] else ""
            lines.append(f"  - partition {f['partition']}: {f['expectation']}({f['column'] or ''}) observed {f['observed']}{where}")
        return "\n".join(lines)


def image_stats(images: torch.Tensor, labels: torch.Tensor, manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per image: height, width, dtype, min/max pixel, and whether the label
    tensor agrees with the manifest. Works on any tensor shape so that a malformed
    partition is reported, not crashed on."""
    n = images.shape[0] if images.ndim > 0 else 0
    flat = images.reshape(n, -1) if n else images.reshape(0, 1)
    height = images.shape[1] if images.ndim >= 2 else 0
    width = images.shape[2] if images.ndim >= 3 else 0
    manifest_labels = torch.as_tensor(manifest["label"].to_numpy().copy()) if "label" in manifest else torch.empty(0)
    agree = (
        (labels.reshape(-1).to(torch.int64) == manifest_labels.to(torch.int64)).tolist()
        if len(manifest_labels) == labels.numel() == n
        else [False] * n
    )
    return pd.DataFrame(
        {
            "height": [height] * n,
            "width": [width] * n,
            "ndim": [images.ndim] * n,
            "dtype": [str(images.dtype).removeprefix("torch.")] * n,
            "pixel_min": flat.amin(dim=1).tolist() if flat.numel() else [],
            "pixel_max": flat.amax(dim=1).tolist() if flat.numel() else [],
            "label_agrees": agree,
        }
    )


def class_shares(manifest: pd.DataFrame) -> pd.DataFrame:
    counts = manifest["label"].value_counts().reindex(range(NUM_CLASSES), fill_value=0)
    return pd.DataFrame({"label": counts.index, "share": (counts / max(len(manifest), 1)).to_numpy()})


def _manifest_expectations(name: str, rows: int) -> list:
    is_test = name == "test"
    max_index = (TEST_TOTAL if is_test else TRAIN_TOTAL) - 1
    return [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=MANIFEST_COLUMNS),
        gxe.ExpectTableRowCountToEqual(value=rows),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in MANIFEST_COLUMNS],
        gxe.ExpectColumnValuesToBeUnique(column="sample_id"),
        gxe.ExpectColumnValuesToBeUnique(column="source_index"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(NUM_CLASSES))),
        gxe.ExpectColumnValuesToBeInSet(column="partition", value_set=[name]),
        gxe.ExpectColumnValuesToBeBetween(column="source_index", min_value=0, max_value=max_index),
    ]


def _image_expectations(rows: int) -> list:
    return [
        gxe.ExpectTableRowCountToEqual(value=rows),
        gxe.ExpectColumnValuesToBeInSet(column="ndim", value_set=[3]),
        gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[28]),
        gxe.ExpectColumnValuesToBeInSet(column="width", value_set=[28]),
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        # A blank (all-zero) image is a corrupt one: every Fashion-MNIST image has ink.
        gxe.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=1, max_value=255),
        gxe.ExpectColumnValuesToBeInSet(column="label_agrees", value_set=[True]),
    ]


def _balance_expectations(tolerance: float) -> list:
    share = 1.0 / NUM_CLASSES
    return [
        gxe.ExpectTableRowCountToEqual(value=NUM_CLASSES),
        gxe.ExpectColumnValuesToBeBetween(column="share", min_value=share * (1 - tolerance), max_value=share * (1 + tolerance)),
    ]


def _union_expectations() -> list:
    return [
        gxe.ExpectColumnValuesToBeUnique(column="sample_id"),
        gxe.ExpectColumnValuesToBeUnique(column="train_source_index"),
    ]


class _Validator:
    """Runs suites on in-memory data frames with an ephemeral GX context."""

    def __init__(self) -> None:
        self.context = gx.get_context(mode="ephemeral")
        self.source = self.context.data_sources.add_pandas("securemark")
        self.report = ValidationReport(success=True)

    def run(self, batch_name: str, partition: str, df: pd.DataFrame, expectations: list) -> None:
        asset = self.source.add_dataframe_asset(batch_name)
        definition = asset.add_batch_definition_whole_dataframe("all")
        suite = self.context.suites.add(gx.ExpectationSuite(name=batch_name, expectations=expectations))
        result = definition.get_batch(batch_parameters={"dataframe": df}).validate(suite, result_format="COMPLETE")
        self.report.results[batch_name] = result.to_json_dict()
        self.report.success &= bool(result.success)
        for res in result.results:
            if res.success:
                continue
            config = res.expectation_config
            details = res.result or {}
            index = details.get("unexpected_index_list") or []
            examples = df.loc[index[:EXAMPLE_ROWS]].to_dict(orient="records") if index else []
            observed = details.get("observed_value", details.get("unexpected_count"))
            if res.exception_info and res.exception_info.get("raised_exception"):
                observed = res.exception_info.get("exception_message")
            self.report.failures.append(
                {
                    "partition": partition,
                    "batch": batch_name,
                    "expectation": config.type,
                    "column": config.kwargs.get("column"),
                    "observed": observed,
                    "example_rows": examples,
                }
            )


def validate_partitions(
    manifests: dict[str, pd.DataFrame],
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    spec: ValidationSpec,
) -> ValidationReport:
    """Validate every partition and their union.

    ``manifests`` and ``tensors`` (images, labels) are keyed by partition name.
    A partition expected by ``spec`` but absent is reported as a failure.
    """
    v = _Validator()
    for name in sorted(set(spec.expected_rows) - set(manifests)):
        v.report.success = False
        v.report.failures.append(
            {"partition": name, "batch": "presence", "expectation": "partition_exists", "column": None, "observed": "missing", "example_rows": []}
        )
    for name, df in manifests.items():
        rows = spec.expected_rows.get(name, -1)
        v.run(f"{name}.manifest", name, df, _manifest_expectations(name, rows))
        images, labels = tensors[name]
        v.run(f"{name}.images", name, image_stats(images, labels, df), _image_expectations(rows))
        if spec.iid or name in ("aux", "attacker", "test"):
            v.run(f"{name}.class_balance", name, class_shares(df), _balance_expectations(spec.class_share_tolerance))
    union = pd.concat(list(manifests.values()), ignore_index=True)
    union["train_source_index"] = union["source_index"].where(union["partition"] != "test")
    v.run("union", "union", union, _union_expectations())
    return v.report
