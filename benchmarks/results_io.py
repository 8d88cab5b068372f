"""Where benchmark scripts put their numbers: print them, then save them as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report(result: Any, path: Path, one_line: bool = True) -> None:
    """Print ``result`` as one JSON line (if ``one_line``) and write it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if one_line:
        line = json.dumps(result)
        print(line)
        path.write_text(line + "\n")
    else:
        path.write_text(json.dumps(result, indent=2) + "\n")
