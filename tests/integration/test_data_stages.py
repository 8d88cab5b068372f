"""prepare + validate through the Prefect engine on a slice of real Fashion-MNIST."""

from __future__ import annotations

import json
import shutil

import mlflow
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.prepare import prepare_flow
from flows.validate import validate_flow
from securemark.errors import ValidationFailed
from securemark.storage import IMAGES_FILE, MANIFEST_FILE
from tests.conftest import SMALL, SMALL_PARAMS, make_project

pytestmark = pytest.mark.integration


def test_prepare_writes_partitions_and_logs_to_mlflow(prepared_project):
    paths = prepared_project
    expected = {"owner_1": 300, "owner_2": 300, "aux": 200, "attacker": 200, "test": 500}
    for name, rows in expected.items():
        df = pd.read_csv(paths.partition(name) / MANIFEST_FILE)
        t = load_file(str(paths.partition(name) / IMAGES_FILE))
        assert len(df) == rows and t["images"].shape == (rows, 28, 28) and t["images"].dtype == torch.uint8
        assert torch.equal(t["labels"], torch.tensor(df["label"].to_numpy()))
    mlflow.set_tracking_uri(f"sqlite:///{paths.root / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["securemark-data"], output_format="list")[0]
    assert run.data.metrics["size.owner_1"] == 300
    assert run.data.params["prepare.owner_size"] == "300"
    histograms = mlflow.artifacts.load_dict(run.info.artifact_uri + "/class_histograms.json")
    assert sum(histograms["test"].values()) == 500


def test_prepare_is_byte_identical_for_same_params(prepared_project, tmp_path, raw_dataset, mlflow_uri, prefect_harness):
    again = make_project(tmp_path / "again", raw_dataset, SMALL_PARAMS)
    prepare_flow(again, SMALL)
    for name in ("owner_1", "aux", "test"):
        for f in (IMAGES_FILE, MANIFEST_FILE):
            assert (again.partition(name) / f).read_bytes() == (prepared_project.partition(name) / f).read_bytes()


def test_validate_passes_and_records_result(project_copy, mlflow_uri, prefect_harness):
    assert validate_flow(project_copy, SMALL)
    report = json.loads((project_copy.reports / "validation.json").read_text())
    assert report["success"] and not report["failures"]
    run = mlflow.search_runs(experiment_names=["securemark-data"], output_format="list")[0]
    assert run.data.metrics["validation.success"] == 1.0


def _rewrite(paths, name, edit):
    """Apply ``edit(df, tensors) -> (df, tensors)`` to one partition on disk."""
    d = paths.partition(name)
    df, tensors = edit(pd.read_csv(d / MANIFEST_FILE), load_file(str(d / IMAGES_FILE)))
    df.to_csv(d / MANIFEST_FILE, index=False)
    save_file(tensors, str(d / IMAGES_FILE))


def _duplicate_first_row(df, t):
    return pd.concat([df, df.iloc[[0]]], ignore_index=True), {k: torch.cat([v, v[:1]]) for k, v in t.items()}


def _label_eleven(df, t):
    df.loc[5, "label"] = 11
    t["labels"][5] = 11
    return df, t


def _failures(paths):
    with pytest.raises(ValidationFailed) as err:
        validate_flow(paths, SMALL)
    report = json.loads((paths.reports / "validation.json").read_text())
    assert not report["success"]
    return err.value, {(f["partition"], f["expectation"], f["column"]) for f in err.value.failures}


def test_duplicated_sample_fails(project_copy, mlflow_uri, prefect_harness):
    _rewrite(project_copy, "owner_1", _duplicate_first_row)
    err, failed = _failures(project_copy)
    assert ("owner_1", "expect_column_values_to_be_unique", "sample_id") in failed
    assert ("owner_1", "expect_table_row_count_to_equal", None) in failed
    assert "partition owner_1" in str(err) and "train-" in str(err)


def test_label_eleven_fails(project_copy, mlflow_uri, prefect_harness):
    _rewrite(project_copy, "owner_2", _label_eleven)
    err, failed = _failures(project_copy)
    assert ("owner_2", "expect_column_values_to_be_in_set", "label") in failed
    row = next(f for f in err.failures if f["column"] == "label" and f["partition"] == "owner_2")
    assert row["example_rows"][0]["label"] == 11


def test_overlap_between_owners_fails(project_copy, mlflow_uri, prefect_harness):
    other = pd.read_csv(project_copy.partition("owner_2") / MANIFEST_FILE)
    other_t = load_file(str(project_copy.partition("owner_2") / IMAGES_FILE))

    def steal(df, t):  # replace owner_1's first row by owner_2's first image
        row = other.iloc[0].copy()
        row["partition"] = "owner_1"
        df.iloc[0] = row
        t["images"][0], t["labels"][0] = other_t["images"][0], other_t["labels"][0]
        return df, t

    _rewrite(project_copy, "owner_1", steal)
    err, failed = _failures(project_copy)
    assert ("union", "expect_column_values_to_be_unique", "train_source_index") in failed
    union = next(f for f in err.failures if f["partition"] == "union" and f["column"] == "train_source_index")
    assert {r["partition"] for r in union["example_rows"]} == {"owner_1", "owner_2"}


def test_missing_partition_fails(project_copy, mlflow_uri, prefect_harness):
    shutil.rmtree(project_copy.partition("aux"))
    _, failed = _failures(project_copy)
    assert ("aux", "partition_exists", None) in failed


def test_blank_image_fails(project_copy, mlflow_uri, prefect_harness):
    def blank(df, t):
        t["images"][3] = 0
        return df, t

    _rewrite(project_copy, "attacker", blank)
    _, failed = _failures(project_copy)
    assert ("attacker", "expect_column_values_to_be_between", "pixel_max") in failed
