"""The package as a user installs it: a wheel that holds every package of the source tree,
and a non-editable install whose ``securemark`` command runs from the installed files."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def source_packages() -> set[str]:
    """Every package (a folder with __init__.py) under src/ and flows/, dotted."""
    found = set()
    for top, base in ((REPO / "src", REPO / "src"), (REPO / "flows", REPO)):
        for init in top.rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found.add(".".join(init.parent.relative_to(base).parts))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(REPO)],
                   check=True, cwd=out, timeout=300)
    (built,) = out.glob("securemark-*.whl")
    return built


def test_the_wheel_holds_every_package_of_the_source_tree(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {".".join(Path(n).parent.parts) for n in names if n.endswith("/__init__.py") or n == "__init__.py"}
    assert source_packages() - in_wheel == set()
    assert "flows/adapters/pyfunc_model.py" in names  # the registry's model loader ships with the package


def test_a_non_editable_install_runs_the_command(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import securemark.privacy, flows.entry.cli; print(securemark.privacy.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(target))  # the installed files, not the source tree
    shown = subprocess.run([str(target / "bin" / "securemark"), "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "issue" in shown.stdout and "trace" in shown.stdout
