"""The attack grid's pure logic: expansion, coalitions, the trade-off table and the
comparison of two audits."""

from __future__ import annotations

import numpy as np
import pandas as pd

from securemark.evaluation.grid import compare_audits, draw_coalitions, expand_grid, is_coalition, tradeoff


def test_list_values_expand_and_compose_steps_do_not():
    grid = [{"attack": "prune", "rate": [0.3, 0.5], "recovery_epochs": [0, 1]},
            {"attack": "compose", "steps": [{"attack": "average"}, {"attack": "prune", "rate": 0.5}]}]
    configs = expand_grid(grid)
    assert len(configs) == 5
    assert {(c["rate"], c["recovery_epochs"]) for c in configs[:4]} == {(0.3, 0), (0.3, 1), (0.5, 0), (0.5, 1)}
    assert configs[4]["steps"] == grid[1]["steps"]
    assert is_coalition(configs[4]) and not is_coalition(configs[0]) and is_coalition({"attack": "average"})


def test_coalitions_are_distinct_and_capped_by_what_exists():
    rng = np.random.default_rng(0)
    drawn = draw_coalitions(rng, ["a", "b", "c"], 2, trials=10)
    assert len(drawn) == 3 and len({tuple(c) for c in drawn}) == 3
    assert all(c == sorted(c) for c in drawn)


def test_tradeoff_finds_the_weakest_failing_strength():
    df = pd.DataFrame([
        {"attack": "noise", "strength": 0.1, "coalition_size": 1, "accuracy": 0.9, "caught": 1, "innocents_accused": 0},
        {"attack": "noise", "strength": 0.3, "coalition_size": 1, "accuracy": 0.7, "caught": 0, "innocents_accused": 0},
        {"attack": "noise", "strength": 1.0, "coalition_size": 1, "accuracy": 0.2, "caught": 0, "innocents_accused": 0},
        {"attack": "prune", "strength": 0.5, "coalition_size": 1, "accuracy": 0.8, "caught": 1, "innocents_accused": 0},
    ])
    table = {r["attack"]: r for r in tradeoff(df)}
    assert table["noise"]["weakest_failing_strength"] == 0.3 and table["noise"]["accuracy_at_failure"] == 0.7
    assert table["prune"]["weakest_failing_strength"] is None and table["prune"]["traced_fraction_overall"] == 1.0


def test_audit_comparison_flags_regressions():
    before = [{"attack": "prune", "coalition_size": 1, "traced_fraction_overall": 1.0, "accuracy_min": 0.5, "innocents_accused": 0},
              {"attack": "noise", "coalition_size": 1, "traced_fraction_overall": 0.5, "accuracy_min": 0.7, "innocents_accused": 0},
              {"attack": "quantize", "coalition_size": 1, "traced_fraction_overall": 1.0, "accuracy_min": 0.8, "innocents_accused": 0}]
    now = [{"attack": "prune", "coalition_size": 1, "traced_fraction_overall": 0.5, "accuracy_min": 0.5, "innocents_accused": 0},
           {"attack": "noise", "coalition_size": 1, "traced_fraction_overall": 1.0, "accuracy_min": 0.7, "innocents_accused": 0},
           {"attack": "permute", "coalition_size": 1, "traced_fraction_overall": 1.0, "accuracy_min": 0.8, "innocents_accused": 0}]
    status = {(r["attack"], r["coalition_size"]): r["status"] for r in compare_audits(before, now)}
    assert status == {("prune", 1): "regressed", ("noise", 1): "improved", ("permute", 1): "new", ("quantize", 1): "gone"}
    assert {r["status"] for r in compare_audits(None, now)} == {"new"}
    accused = [{**now[0], "traced_fraction_overall": 1.0, "innocents_accused": 1}]
    assert compare_audits(before[:1], accused)[0]["status"] == "regressed"  # an innocent accused is a regression
