"""Settings: the committed params.yaml builds, every section is typed, and every bad
value is refused before any work with an error that names its key."""

from __future__ import annotations

import copy
from dataclasses import fields

import pytest
import yaml

from flows.adapters.settings import Settings, load_params
from securemark.errors import ConfigError, InvalidConfig
from securemark.model import ModelSpec
from securemark.split.protocol import TrainConfig
from tests.conftest import REPO, SMALL_PARAMS


def test_committed_params_build_every_section():
    params = load_params(REPO / "params.yaml")
    settings = Settings.from_params(params)
    assert {f.name for f in fields(Settings)} == set(params) - {"profiles"}  # no section unused, none missing
    assert isinstance(settings.model, ModelSpec) and isinstance(settings.train.config, TrainConfig)
    assert settings.train.config.seed == settings.base.seed == params["base"]["seed"]
    assert settings.privacy_audit.seed == params["base"]["seed"]
    assert settings.fingerprint.embed.layer == params["fingerprint"]["layer"]
    assert settings.fingerprint.code.family == params["fingerprint"]["code"]["family"]
    assert len(settings.attack.configs()) >= len(params["attack"]["grid"])
    assert settings.issue.customer_ids()[0] == "customer-0001"


def test_the_test_profile_builds_from_the_same_schema():
    settings = Settings.from_params(SMALL_PARAMS)
    assert settings.prepare.owners == 2 and settings.base.profile == "default"


def test_the_full_profile_overlays_only_evaluation_sizes():
    params = load_params(REPO / "params.yaml")
    default, full = Settings.from_params(params, "default"), Settings.from_params(params, "full")
    assert default == Settings.from_params(params) and default.base.profile == "default" and full.base.profile == "full"
    assert len(full.attack.configs()) > len(default.attack.configs()) and full.attack.trials >= 5
    assert full.trace.null_random_keys > default.trace.null_random_keys and full.blackbox.null_secrets > default.blackbox.null_secrets
    for same in ("data", "prepare", "model", "train", "defence", "vendor", "fingerprint", "issue"):
        assert getattr(full, same) == getattr(default, same), same  # the data, the models and the copies are shared
    assert full.attacker.budget == default.attacker.budget and full.attacker.min_steps == default.attacker.min_steps  # what every attack uses
    assert set(default.attacker.budgets) < set(full.attacker.budgets)  # the attacker-alone curve: an evaluation size
    assert full.trace.drift_recipes == default.trace.drift_recipes and full.blackbox.patterns == default.blackbox.patterns


def test_the_private_profile_is_a_whole_design_whose_attacks_follow_the_fingerprint():
    """``private`` changes the design (the cut, a 64-number bottleneck, the defence, the
    fingerprinted layer) and nothing the evaluation measures; its fingerprinted layer and
    every layer its grid aims at exist in its model."""
    from securemark.fingerprint import fingerprint_unit
    from securemark.model import build_model, units

    params = load_params(REPO / "params.yaml")
    default, private = Settings.from_params(params, "default"), Settings.from_params(params, "private")
    assert private.model.bottleneck == 64 and private.model.cut == 2 and default.model.bottleneck == 0
    for same in ("data", "prepare", "train", "blackbox", "trace", "attacker", "issue"):
        assert getattr(private, same) == getattr(default, same), same
    model = build_model(private.model, 0)
    fingerprint_unit(model, private.fingerprint.embed.layer)  # raises if the layer is not a block of this model
    paths = {p for p, _ in units(model)}
    aimed = [layer for c in private.attack.configs() for step in [c, *c.get("steps", [])] if step["attack"] == "obfuscate"
             for layer in step["layers"]]
    assert aimed and set(aimed) <= paths and "server.dense2" in aimed


def test_profiles_merge_mappings_and_replace_lists():
    params = copy.deepcopy(SMALL_PARAMS)
    params["profiles"] = {"wide": {"attack": {"coalition_sizes": [2, 3]}, "trace": {"null_random_keys": 5}}}
    wide = Settings.from_params(params, "wide")
    assert wide.attack.coalition_sizes == (2, 3) and wide.trace.null_random_keys == 5
    assert wide.attack.grid == Settings.from_params(params).attack.grid  # keys the overlay does not name stay
    params["base"]["profile"] = "wide"
    assert Settings.from_params(params).trace.null_random_keys == 5  # base.profile selects it


@pytest.mark.parametrize("profiles, profile, fragment", [
    ({}, "nightly", "unknown profile 'nightly'"),
    ({"x": {"nosuch": {"a": 1}}}, "x", "profiles.x.nosuch"),
    ({"x": {"trace": {"nosuch": 1}}}, "x", "trace.nosuch"),
    ({"default": {"trace": {"null_random_keys": 1}}}, "default", "profiles.default"),
    ({"x": 3}, "x", "profiles"),
])
def test_bad_profiles_are_refused_naming_the_key(profiles, profile, fragment):
    params = copy.deepcopy(SMALL_PARAMS)
    params["profiles"] = profiles
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        Settings.from_params(params, profile)


def test_the_pipeline_sets_the_profile_keeping_the_rest_of_params_yaml(tmp_path):
    from flows.entry.pipeline import set_profile

    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    path.write_text(text)
    assert set_profile(path, "full") is True
    changed = path.read_text()
    assert Settings.load(path).base.profile == "full"
    assert [a for a, b in zip(text.splitlines(), changed.splitlines()) if a != b] == [next(l for l in text.splitlines() if "  profile:" in l)]
    assert set_profile(path, "full") is False and set_profile(path, "default") is True and path.read_text() == text
    with pytest.raises(ConfigError, match="unknown profile"):
        set_profile(path, "nightly")
    assert path.read_text() == text  # refused before anything is written


def _with(section: str, key: str, value) -> dict:
    params = copy.deepcopy(SMALL_PARAMS)
    params[section][key] = value
    return params


@pytest.mark.parametrize(
    "section, key, value, named",
    [
        ("trace", "scorer", "bogus", "scorer"),
        ("trace", "decoder", "bogus", "decoder"),
        ("trace", "epsilon", 2.0, "epsilon"),
        ("train", "transport", "carrier-pigeon", "transport"),
        ("train", "epochs", 0, "train.epochs"),
        ("model", "cut", 9, "model.cut"),
        ("prepare", "owners", 0, "prepare.owners"),
        ("trace", "no_such_key", 1, "trace.no_such_key"),
        ("ops", "max_workers", 0, "max_workers"),
        ("fingerprint", "margin", -1.0, "margin"),
        ("fingerprint", "shed_keys", [0.4, 0.2], "fingerprint.shed_keys"),
        ("fingerprint", "shed_keys", [1.5], "fingerprint.shed_keys"),
        ("fingerprint", "shed_keys", 0.2, "fingerprint.shed_keys"),
    ],
)
def test_bad_values_name_their_key(section, key, value, named):
    with pytest.raises(ConfigError) as err:
        Settings.from_params(_with(section, key, value))
    assert named in str(err.value)


def test_bad_attack_grid_entries_are_refused_before_any_work():
    for entry, named in [({"attack": "bogus"}, "bogus"), ({"attack": "prune", "rate": 3.0}, "rate"), ({"attack": "prune", "ratio": 0.5}, "ratio"),
                          ({"attack": "distill", "budget": 0}, "budget"), ({"attack": "distill", "budget": "all"}, "budget")]:
        params = copy.deepcopy(SMALL_PARAMS)
        params["attack"]["grid"] = [entry]
        with pytest.raises(ConfigError) as err:
            Settings.from_params(params)
        assert named in str(err.value) and "attack.grid" in str(err.value)


def test_attacks_aimed_at_the_fingerprint_follow_its_layer():
    """``fingerprinted`` in an attack's layers names the block fingerprint.layer names,
    also inside a composed attack; other layers stay as written."""
    params = copy.deepcopy(SMALL_PARAMS)
    params["fingerprint"]["layer"] = "server.dense2.linear.weight"
    params["attack"]["grid"] = [{"attack": "obfuscate", "layers": ["server.block2", "fingerprinted"]},
                                {"attack": "compose", "steps": [{"attack": "average"}, {"attack": "obfuscate", "layers": ["fingerprinted"]}]}]
    plain, composed = Settings.from_params(params).attack.configs()
    assert plain["layers"] == ["server.block2", "server.dense2"]
    assert composed["steps"][1]["layers"] == ["server.dense2"]
    committed = Settings.load(REPO / "params.yaml", "full")
    aimed = [c["layers"] for c in committed.attack.configs() if c["attack"] == "obfuscate"]
    assert aimed and all(committed.fingerprint.embed.layer.startswith(layers[-1] + ".") for layers in aimed)


def test_bad_code_family_and_unknown_section_are_refused():
    params = copy.deepcopy(SMALL_PARAMS)
    params["fingerprint"]["code"] = {"family": "hamming", "capacity": 10}
    with pytest.raises(ConfigError, match="hamming"):
        Settings.from_params(params)
    with pytest.raises(ConfigError, match="unknown section"):
        Settings.from_params({**SMALL_PARAMS, "extras": {}})
    missing = {k: v for k, v in SMALL_PARAMS.items() if k != "trace"}
    with pytest.raises(ConfigError, match="trace"):
        Settings.from_params(missing)


def test_cli_overrides_are_validated():
    settings = Settings.from_params(SMALL_PARAMS)
    assert settings.trace.with_overrides(epsilon=1e-3).epsilon == 1e-3
    with pytest.raises(InvalidConfig, match="scorer"):
        settings.trace.with_overrides(scorer="bogus")


def test_settings_round_trip_through_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(SMALL_PARAMS))
    assert Settings.load(path) == Settings.from_params(SMALL_PARAMS)
