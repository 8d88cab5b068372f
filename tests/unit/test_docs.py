"""The documentation says only what is true: the measured block of docs/results.md is what
the committed metrics give, the README's links resolve, and its code layout names every
package."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import results_doc  # noqa: E402


def test_the_generated_results_are_those_of_the_committed_metrics():
    done = subprocess.run([sys.executable, "scripts/results_doc.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_check_fails_when_a_metric_changes(tmp_path):
    metrics = tmp_path / "metrics"
    shutil.copytree(REPO / "metrics", metrics)
    trace = json.loads((metrics / "trace.json").read_text())
    trace["null_accusations"] += 1
    (metrics / "trace.json").write_text(json.dumps(trace))
    doc = (REPO / "docs" / "results.md").read_text()
    assert results_doc.rewrite(doc, results_doc.render(metrics)) != doc


def test_readme_links_resolve_and_the_layout_names_every_package():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target
    layout = readme[readme.index("## Code layout"):]
    packages = [p.parent for p in (REPO / "src" / "securemark").rglob("__init__.py")] + [p.parent for p in (REPO / "flows").rglob("__init__.py")]
    for package in packages:
        if package.name in ("securemark", "flows"):
            continue
        assert f"{package.name}/" in layout, f"README's code layout omits {package.relative_to(REPO)}"
