"""DVC must re-run a stage when code it runs changes: every project module a stage's
command imports (transitively, lazy imports included) is covered by the stage's deps."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"flows": REPO / "flows", "securemark": REPO / "src" / "securemark"}


def module_file(name: str) -> Path | None:
    """The file of a project module (``flows.x`` / ``securemark.y.z``), or None."""
    top, *rest = name.split(".")
    if top not in ROOTS:
        return None
    base = ROOTS[top].joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (``from a import b`` may name a submodule)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO / "src" if "src" in path.parts else REPO).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.rsplit(".", node.level)[0]
                base = f"{parent}.{node.module}" if node.module else parent
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in ROOTS}


# Modules that change no stage's result, and are not followed: the exception classes,
# the entry's exit contract, logging set-up, and the params parser (a stage depends on
# the params *values* it reads, listed as its params, not on the parser: dvc.yaml).
NOT_FOLLOWED = {"src/securemark/errors.py", "flows/adapters/stage.py", "flows/adapters/logs.py", "flows/adapters/settings.py"}


def closure(module: str) -> set[Path]:
    """Files of every project module reached from ``module`` (packages' __init__ included),
    not descending into NOT_FOLLOWED."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                if path.relative_to(REPO).as_posix() not in NOT_FOLLOWED:
                    todo.extend(imported(path))
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(stages()))
def test_a_stages_deps_cover_the_code_it_runs(name):
    stage = stages()[name]
    module = stage["cmd"].split("python -m ", 1)[1].split()[0]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    exempt = NOT_FOLLOWED | {"src/securemark/__init__.py", "flows/__init__.py", "flows/entry/__init__.py", "flows/adapters/__init__.py"}
    missing = sorted(p.relative_to(REPO).as_posix() for p in closure(module)
                     if not covered(p, deps) and p.relative_to(REPO).as_posix() not in exempt)
    assert not missing, f"stage {name} runs code its deps do not list: {missing}"


def test_the_check_sees_lazy_imports():
    assert module_file("securemark.embedding") in closure("flows.issue")
    assert module_file("securemark.tracing.blackbox") in closure("flows.issue")  # imported inside a function of the adapters


# ----------------------------------------------------------------------------- params
SETTINGS_READ = re.compile(r"\bsettings\.([a-z_]+)\b")
SECTIONS = set(yaml.safe_load((REPO / "params.yaml").read_text())) - {"profiles"}


def sections_read(module: str) -> set[str]:
    """params.yaml sections the code a stage runs reads (``settings.<section>`` anywhere in
    its closure; the settings parser's cross-section checks excepted, as for the deps)."""
    found = set()
    for path in closure(module):
        if path.relative_to(REPO).as_posix() in NOT_FOLLOWED:
            continue
        found.update(m for m in SETTINGS_READ.findall(path.read_text()) if m in SECTIONS)
    return found


def params_of(stage: dict) -> list[str]:
    return [p for entry in stage.get("params", []) for p in ([entry] if isinstance(entry, str) else list(entry))]


def covers(params: list[str], key: str) -> bool:
    """``key`` (``section`` or ``section.sub``) is tracked: listed itself, or a parent or child of it."""
    return any(p == key or key.startswith(p + ".") or p.startswith(key + ".") for p in params)


# Sections a stage's closure mentions in code the stage does not run (the scan is by file).
NOT_READ_BY = {
    "issue": {"attacker"},             # attacker.budget sizes the drift model (flows/adapters/vendor.py), fitted by trace, not issue
    "train_undefended": {"defence"},   # the undefended variant trains with DefenceConfig() (flows/adapters/jobs.py)
}


@pytest.mark.parametrize("name", sorted(stages()))
def test_a_stages_params_cover_the_sections_it_reads(name):
    stage = stages()[name]
    module = stage["cmd"].split("python -m ", 1)[1].split()[0]
    params = params_of(stage)
    read = sections_read(module) - {"base", "ops"} - NOT_READ_BY.get(name, set())
    missing = sorted(s for s in read if not covers(params, s))
    assert not missing, f"stage {name} reads params sections its dvc.yaml params do not list: {missing}"


@pytest.mark.parametrize("name", sorted(stages()))
def test_a_stage_reading_a_section_a_profile_overlays_tracks_that_overlay(name):
    """A profile that changes a section a stage reads must re-run the stage when it (or the
    profile chosen) changes: the stage lists ``base.profile`` and ``profiles.<name>.<section>``."""
    profiles = yaml.safe_load((REPO / "params.yaml").read_text()).get("profiles") or {}
    params = params_of(stages()[name])
    needed = sorted({f"profiles.{p}.{section}" for p, overlay in profiles.items() for section, values in overlay.items()
                     for key in (values if isinstance(values, dict) else [None])
                     if covers(params, section if key is None else f"{section}.{key}")})
    missing = [k for k in needed if not covers(params, k)] + (["base.profile"] if needed and not covers(params, "base.profile") else [])
    assert not missing, f"stage {name} reads sections a profile overlays but does not track: {missing}"
