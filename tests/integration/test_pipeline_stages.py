"""The later stages end to end on a tiny profile of real data: both trainings, the
privacy audit, issuing, the trace stage (copies and null models) and the attack grid."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flows.adapters.settings import Settings
from tests.conftest import isolated_copy, small_params

pytestmark = pytest.mark.integration

PARAMS = small_params(attack={
    "targets": 1,
    "trials": 1,
    "coalition_sizes": [2],
    "grid": [
        {"attack": "fine_tune", "epochs": 1},
        {"attack": "prune", "rate": [0.3, 0.6]},
        {"attack": "average"},
        {"attack": "compose", "steps": [{"attack": "average"}, {"attack": "prune", "rate": 0.5}]},
        {"attack": "compose", "steps": [{"attack": "permute"}, {"attack": "rescale", "spread": 10.0}]},
        {"attack": "distill", "labels": ["soft", "hard"], "epochs": 2},
        {"attack": "distill", "labels": "hard", "student": "other", "widths": [4, 8], "hidden": [16], "epochs": 2, "budget": 200},
        {"attack": "serve_coalition", "mode": "vote"},
        {"attack": "query_filter", "detector": "softmax", "fallback": "second"},
    ],
})
SETTINGS = Settings.from_params(PARAMS)


@pytest.fixture(scope="module")
def staged(prepared_project, prefect_harness, tmp_path_factory):
    """Run train (both variants) and issue once for the module."""
    from flows.attacker_baseline import _stage as baseline_stage
    from flows.issue import _stage as issue_stage
    from flows.train import train_flow

    with isolated_copy(prepared_project, tmp_path_factory.mktemp("stages") / "project") as (paths, _):
        for variant in ("defended", "undefended"):
            train_flow(paths, SETTINGS, variant)
        baseline_stage(paths, SETTINGS)
        issue_stage(paths, SETTINGS)
        yield paths


def test_train_writes_metrics_and_feature_bank(staged):
    metrics = json.loads((staged.metrics / "train.json").read_text())
    assert {"test_accuracy", "epochs", "seconds"} <= set(metrics)
    assert 0.3 < metrics["test_accuracy"] <= 1.0  # two tiny epochs, well above chance (0.1)
    assert (staged.features / "defended_bank.safetensors").is_file()
    assert json.loads((staged.metrics / "train_undefended.json").read_text())["epochs"] == 2


def test_attacker_baseline_trains_each_budget_with_the_vendors_recipe(staged):
    rows = json.loads(staged.attacker_baseline.read_text())
    assert [r["budget"] for r in rows] == list(SETTINGS.attacker.budgets)
    for r in rows:
        assert 0.1 < r["accuracy"] <= 1.0 and r["epochs"] >= SETTINGS.train.config.epochs
        assert r["steps"] >= SETTINGS.attacker.min_steps
        assert staged.attacker_alone_model(r["budget"]).is_file()


def test_privacy_audit_writes_metrics_and_grid(staged):
    from flows.privacy_audit import privacy_audit_flow

    results = privacy_audit_flow(staged, SETTINGS)
    on_disk = json.loads((staged.metrics / "privacy.json").read_text())
    assert set(on_disk) == {"defended", "undefended", "accuracy_gap_pt", "zoo", "owners"} and on_disk["zoo"] == "budgeted"
    assert set(on_disk["owners"]) == {"1", "2"}  # a privacy report per owner: its leakage, picture, MLflow run
    for owner, report in on_disk["owners"].items():
        assert report["images"] > 0 and report["leakage"] >= 0 and report["strongest"] in report["ssim"]
        assert (staged.reports / f"privacy_owner_{owner}.png").exists()
    zoo = set(SETTINGS.privacy_audit.attackers)
    assert {"decoder", "strong_decoder", "inversion", "label_floor"} <= zoo
    for variant in ("defended", "undefended"):
        v = on_disk[variant]
        assert {"test_accuracy", "label_floor_ssim", "leakage", "strongest", "feature_dcor", "attackers", "mse_lower_bound", "dfil"} <= set(v)
        assert set(v["attackers"]) == zoo
        for scores in v["attackers"].values():
            assert -1.0 <= scores["ssim"] <= 1.0 and 0.0 <= scores["dcor"] <= 1.0 and scores["psnr"] > 0
        best = max(s["ssim"] for s in v["attackers"].values())
        assert v["leakage"] == pytest.approx(best - v["label_floor_ssim"]) and v["leakage"] >= 0
        assert v["label_floor_ssim"] == v["attackers"]["label_floor"]["ssim"]
    assert results["defended"]["leakage"] == on_disk["defended"]["leakage"]
    grid = Image.open(staged.reports / "privacy_grid.png")
    assert grid.size[1] > grid.size[0] > 0  # 8 columns; owner images, then one row per variant and attacker
    from flows.adapters import tracking

    tracking.configure(staged)
    runs = mlflow.search_runs(experiment_names=["securemark-train"], filter_string="tags.stage = 'privacy_audit' and tags.attacker = 'inversion'")
    assert set(runs["tags.variant"]) == {"defended", "undefended"}
    owners = mlflow.search_runs(experiment_names=["securemark-train"], filter_string="tags.stage = 'privacy_audit' and tags.owner = '1'")
    assert len(owners) == 1 and owners["metrics.leakage"].iloc[0] >= 0


def test_issue_stage_metrics(staged):
    metrics = json.loads((staged.metrics / "fingerprint.json").read_text())
    assert metrics["copies"] == 2 and metrics["ber_max"] == 0.0
    assert metrics["margin_min"] >= SETTINGS.fingerprint.embed.margin
    assert metrics["code_length"] == SETTINGS.fingerprint.code.options["code_length"]


def test_trace_stage_accuses_each_copy_and_no_null_model(staged):
    from flows.trace import trace_stage_flow

    metrics = trace_stage_flow(staged, SETTINGS)
    assert metrics["copies_traced"] == metrics["copies_correct"] == 2
    keys = SETTINGS.trace.null_random_keys
    independent = len(SETTINGS.attacker.budgets) * (1 + keys)  # attacker-alone models, under the vendor's key and others
    assert metrics["null_models"] == 1 + independent + 2 * keys
    assert metrics["null_accusations"] == 0 and metrics["max_null_score_ratio"] < 1.0
    readings = 2 if SETTINGS.trace.drift_samples else 1  # plain and drift-whitened
    assert metrics["null_scores_independent"] == independent * SETTINGS.fingerprint.code.capacity * readings
    assert metrics["null_accusations_independent"] == 0


def test_blackbox_stage_traces_copies_through_their_apis_and_no_null_api(staged):
    from flows.blackbox import _stage

    _stage(staged, SETTINGS)
    metrics = json.loads(staged.blackbox_metrics.read_text())
    bb = SETTINGS.blackbox
    assert metrics["copies"] == metrics["copies_correct"] == 2
    assert 0 < metrics["queries_max"] <= bb.keys
    # base + attacker-alone models under the vendor's keys, every model under each null secret
    assert metrics["null_apis"] == (1 + len(SETTINGS.attacker.budgets)) * (1 + bb.null_secrets) + 2 * bb.null_secrets
    assert metrics["null_accusations"] == 0 and metrics["max_null_score_ratio"] < 1.0
    assert metrics["distillation_trials"] == bb.distill_trials and metrics["distillation_innocents_accused"] == 0
    # the filters are fitted to refuse 5 % of the attacker's own images: on the test images
    # they refuse some, far from all
    assert metrics["filter_trials"] == 4 and 0.0 < metrics["filter_refused_test_max"] < 0.5
    assert metrics["filter_refused_keys_min"] <= metrics["filter_refused_keys_max"]
    # the marks' cost is a difference of two test accuracies, in points: a multiple of
    # 100 / test images, and small
    cost = metrics["accuracy_cost_max"] * SETTINGS.prepare.test_size / 100
    assert abs(cost - round(cost)) < 1e-3 and abs(metrics["accuracy_cost_max"]) < 15


def test_both_key_families_issue_copies_the_api_channel_traces(staged, tmp_path):
    """The default ``blackbox.family: natural`` keys are unmodified aux images the base is
    unsure of (binary symbols); ``patterns`` keys are secret block patterns blended into aux
    images (one of 10 classes per pattern). A copy issued with either is traced through its
    label-only answers; the base and another vendor's keys accuse no one."""
    import dataclasses

    from flows.adapters.vendor import vendor_config, vendor_files
    from securemark.storage import read_partition
    from securemark.tracing.blackbox import label_api
    from securemark.vendor import Vendor
    from securemark.weights import load_weights

    assert SETTINGS.blackbox.family == "natural"  # the product's default, small
    aux = read_partition(staged.partition("aux")).as_float()
    for family, q in (("natural", 2), ("patterns", 10)):
        settings = Settings.from_params(small_params(blackbox={"family": family}))
        files = dataclasses.replace(vendor_files(staged, settings), state_dir=tmp_path / family / "vendor", secret=tmp_path / family / "vendor.key")
        vendor = Vendor.open(files, vendor_config(settings))
        keys = vendor.keyset
        assert len(keys) == settings.blackbox.keys == 64 and keys.q == q and vendor.blackbox_codebook.q == q
        if family == "natural":
            assert torch.equal(keys.images, aux[keys.rows])  # unmodified vendor images
        else:
            assert not any(torch.equal(k, a) for k, a in zip(keys.images, aux[keys.rows]))  # each carries a pattern

        [outcome] = vendor.embed([("customer-n1", 3)])
        copy = outcome.result.model
        result = vendor.trace_api(label_api(copy)).result
        assert [c.codeword_index for c in result.verdict.accused] == [3] and result.queries <= 64, family
        assert not vendor.trace_api(label_api(load_weights(files.base_model))).result.verdict.accused
        other = vendor.api_probe(bytes(range(32)))  # another vendor's secret
        assert not other.trace(label_api(copy), settings.trace.epsilon).verdict.accused


def test_a_copy_that_cannot_keep_every_key_flip_is_retried_with_flips_given_back(staged, tmp_path):
    """``fingerprint.shed_keys``: a copy that misses its accuracy with every natural key
    flipped is embedded again with a share of its flips given back to the base's answer
    (the keys the base is surest of first). The result counts them, and its key agreement
    is with the customer's own symbols; a copy that fails every retry says so."""
    import dataclasses

    from flows.adapters.vendor import vendor_config, vendor_files
    from securemark.tracing.blackbox import targets
    from securemark.vendor import Vendor

    def vendor_with(**fingerprint):
        settings = Settings.from_params(small_params(fingerprint=fingerprint))
        files = dataclasses.replace(vendor_files(staged, settings), state_dir=tmp_path / str(fingerprint), secret=tmp_path / "vendor.key")
        return Vendor.open(files, vendor_config(settings))

    # no pull on the keys (key_weight 0): a copy keeps about the base's answers, which are about half of its symbols
    # (a word flips about half of the keys); with every flip given back it answers about 0.9 of them, over key_agreement 0.8
    vendor = vendor_with(key_weight=0.0, key_agreement=0.8, accuracy_tolerance=0.05, max_steps=200, shed_keys=[1.0])
    outcomes = vendor.embed([(f"customer-s{i}", i) for i in range(2)])
    keys = vendor.keyset
    for i, outcome in enumerate(outcomes):
        assert outcome.error is None, outcome.error
        own = targets(keys, vendor.blackbox_codebook.word(i))
        assert outcome.result.keys_shed == int((own != keys.candidates[:, 0]).sum()) > 0
        answers = outcome.result.model.eval()(keys.images).argmax(1)
        assert outcome.result.key_agreement == pytest.approx(float((answers == own).double().mean()))  # its own symbols

    [failed] = vendor_with(max_steps=1, shed_keys=[0.5, 1.0]).embed([("customer-s2", 6)])  # no copy is made in one step
    assert failed.result is None and "with 50% of the key flips given back" in str(failed.error) and "100%" in str(failed.error)


def test_attack_stage_traces_attacked_copies(staged):
    from flows.attack import CSV_COLUMNS, _stage

    _stage(staged, SETTINGS)
    rows = pd.read_csv(staged.metrics / "attacks.csv")
    assert list(rows.columns) == CSV_COLUMNS
    assert set(rows["attack"]) == {"fine_tune_adam", "prune", "average", "average>prune", "permute>rescale",
                                   "distill_soft", "distill_hard", "distill_hard_other@200", "serve_coalition_vote",
                                   "query_filter_softmax_second"}
    assert len(rows) == 1 + 2 + 1 + 1 + 1 + 3 + 1 + 1
    assert (rows["innocents_accused"] == 0).all() and (rows["innocents_accused_api"] == 0).all()
    copy = rows[rows["attack"] == "fine_tune_adam"].iloc[0]
    assert copy["traced_by"] in ("both", "api", "weights") and 0 < copy["queries_api"] <= SETTINGS.blackbox.keys
    served = rows[rows["attack"].isin(["serve_coalition_vote", "query_filter_softmax_second"])]
    assert (served["caught"] == 0).all() and served["ber"].isna().all()  # an API only: nothing for the weights channel
    baseline = {r["budget"]: r["accuracy"] for r in json.loads(staged.attacker_baseline.read_text())}
    assert SETTINGS.attacker.budget == 100 and set(rows["attacker_budget"]) == {100, 200}  # one entry on 200 of its images
    assert np.allclose(rows["attacker_alone_accuracy"], rows["attacker_budget"].map(baseline), atol=1e-5)  # each against its own baseline
    assert (rows["worth_it"] == (rows["accuracy"] > rows["attacker_alone_accuracy"])).all()
    other = rows[rows["attack"] == "distill_hard_other@200"].iloc[0]
    assert other["attacker_budget"] == 200
    assert other["caught"] == 0 and pd.isna(other["ber"])  # another architecture: no weights to read
    read = other["key_agreement"] * SETTINGS.blackbox.keys  # ... but its answers to the keys are read: a share of the keys
    assert 0 <= other["key_agreement"] <= 1.0 and abs(read - round(read)) < 1e-3
    # Re-parametrisation scrambles the raw weights; re-alignment reads the mark again.
    reparam = rows[rows["attack"] == "permute>rescale"].iloc[0]
    assert reparam["ber_unaligned"] > 0.2 and reparam["ber"] == 0 and reparam["caught"] == 1
    mild = rows[(rows["attack"] == "prune") & (rows["strength"] == 0.3)]
    assert (mild["caught"] == 1).all() and (mild["ber"] == 0).all()
    summary = json.loads((staged.metrics / "attacks.json").read_text())
    assert {t["attack"] for t in summary["tradeoff"]} == set(rows["attack"])
    parts = summary["tracing"]
    assert sum(parts[k]["attacked_models"] for k in ("worth_it_within_2pt", "worth_it_beyond_2pt", "not_worth_it")) == len(rows)
    assert summary["attacker_budget"] == SETTINGS.attacker.budget


@pytest.mark.parametrize("code", [{"family": "random", "capacity": 50, "code_length": 64},
                                  {"family": "tardos", "capacity": 50, "code_length": 64, "max_colluders": 2},
                                  {"family": "bibd", "capacity": 50, "order": 7}])
def test_issue_stage_runs_with_every_code_family(code, prepared_project, prefect_harness, tmp_path):
    """Each family's codebook has its own parameters (bibd has no code_length): the stage
    reads the length from the codebook, never from params."""
    from flows.issue import _stage as issue_stage
    from flows.train import train_flow

    # bibd words are mostly ones (a coherent push on a tiny model): a loose tolerance, since
    # this test is about the stage reading each family's length, not about accuracy
    settings = Settings.from_params(small_params(fingerprint={"code": code, "accuracy_tolerance": 0.3}, issue={"customers": 1}))
    with isolated_copy(prepared_project, tmp_path / "project") as (paths, _):
        train_flow(paths, settings)
        issue_stage(paths, settings)
        metrics = json.loads(paths.fingerprint_metrics.read_text())
    assert metrics["copies"] == 1 and metrics["ber_max"] == 0.0
    assert metrics["code_length"] == (57 if code["family"] == "bibd" else 64)  # PG(2, 7): 7^2 + 7 + 1
