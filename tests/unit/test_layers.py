"""Imports run one way: the core never reaches the flows, the core's packages by concept
(plug-ins, evaluation, tracing, the vendor service; privacy below split training), and
no stage imports another or the entry layer.

Read from the source (every ``import``, lazy ones inside functions included), so a new
import that breaks a layer fails here, naming the module and what it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "src" / "securemark"
STAGES = {"flows.prepare", "flows.validate", "flows.train", "flows.attacker_baseline", "flows.privacy_audit", "flows.issue", "flows.trace",
          "flows.blackbox", "flows.attack"}  # what dvc.yaml runs; the deployments (flows.entry.ops) compose them


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO / "src" if path.is_relative_to(REPO / "src") else REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def modules(root: Path) -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(root.rglob("*.py"))}


def offenders(mods: dict[str, set[str]], source: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {i}" for m, names in mods.items() if m == source or m.startswith(source + ".")
                  for i in names if i.startswith(forbidden))


CORE_RULES = [
    ("securemark", ("flows",)),                                          # the core never reaches the entry points or adapters
    ("securemark.privacy", ("securemark.split",)),                       # split training uses the privacy package, not the reverse
    ("securemark.attacks", ("securemark.evaluation", "securemark.vendor")),  # plug-ins only
    ("securemark.tracing", ("securemark.evaluation", "securemark.vendor", "securemark.attacks")),
    ("securemark.evaluation", ("securemark.vendor",)),
]


@pytest.mark.parametrize("source,forbidden", CORE_RULES, ids=[r[0] for r in CORE_RULES])
def test_core_layers(source, forbidden):
    assert not offenders(modules(CORE), source, forbidden)


def test_no_stage_imports_another_stage_or_the_entry_layer():
    flows = modules(REPO / "flows")
    bad = [f"{m} imports {i}" for m in STAGES for i in flows[m] if i.startswith("flows.entry") or any(i == s or i.startswith(s + ".") for s in STAGES - {m})]
    assert not bad
    below_entry = {m: names for m, names in flows.items() if m.startswith("flows.adapters")}
    assert not offenders(below_entry, "flows.adapters", ("flows.entry",) + tuple(STAGES))


def test_the_rules_see_a_violation(tmp_path):
    """The check itself can fail: a module that imports across a layer is named."""
    fake = {"securemark.privacy.x": {"securemark.split.parties"}}
    assert offenders(fake, "securemark.privacy", ("securemark.split",)) == ["securemark.privacy.x imports securemark.split.parties"]
