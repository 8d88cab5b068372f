"""``make run``: the default pipeline (``dvc repro``) against one Prefect server.

    python -m flows.entry.pipeline [--profile NAME] [dvc repro arguments, e.g. a stage name]

Every stage is a Prefect flow. Without ``PREFECT_API_URL`` each stage's process would
start (and stop) a temporary Prefect server of its own, about 10 s each; this entry
starts one server on a free 127.0.0.1 port for the whole run (state in ``.prefect/``),
runs ``dvc repro`` with that server's URL, prints ``dvc metrics show`` and stops the
server, also on Ctrl-C or failure. With ``PREFECT_API_URL`` already set, that server is
used and nothing is started. The exit code is ``dvc repro``'s.

``--profile NAME`` (``make run PROFILE=full``) first writes ``base.profile: NAME`` into
params.yaml (README "Profiles"), so that DVC sees the change, re-runs the stages that read
what the profile changes (``full``: evaluation sizes; ``private``: the design, so training
and everything after it) and records it in dvc.lock; the rest of the file is left as it
is. An unknown profile is refused before anything runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.adapters.paths import Paths
from flows.adapters.servers import free_port, prefect_server
from flows.adapters.settings import Settings, load_params
from flows.adapters.stage import exit_invalid
from securemark.errors import ConfigError, SecureMarkError

_PROFILE_LINE = re.compile(r"^(base:[ \t]*(?:#.*)?\n(?:[ \t]+.*\n|[ \t]*\n)*?[ \t]+profile:[ \t]*)([^\s#]+)", re.MULTILINE)


def set_profile(params_file: Path, name: str) -> bool:
    """Write ``base.profile: name`` into ``params_file``, keeping every other line (and
    comment) as it is; True when the file changed. The profile is checked first."""
    Settings.from_params(load_params(params_file), name)  # an unknown profile or a bad overlay: ConfigError
    text = params_file.read_text()
    match = _PROFILE_LINE.search(text)
    if match is None:
        raise ConfigError("base.profile", f"{params_file} has no `profile:` line in its base section to set")
    if match.group(2) == name:
        return False
    params_file.write_text(text[: match.start(2)] + name + text[match.end(2):])
    return True


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _repro(args: list[str], env: dict[str, str]) -> int:
    start = time.perf_counter()
    code = subprocess.call(_dvc("repro", *args), env=env)
    if code == 0:
        subprocess.call(_dvc("metrics", "show"), env=env)
    print(f"dvc repro finished with exit code {code} in {time.perf_counter() - start:.0f} s", flush=True)
    return code


def _split_profile(args: list[str]) -> tuple[str | None, list[str]]:
    """``--profile NAME`` / ``--profile=NAME`` taken out of the arguments (the rest go to dvc repro)."""
    profile, rest, i = None, [], 0
    while i < len(args):
        if args[i] == "--profile":
            if i + 1 >= len(args) or not args[i + 1] or args[i + 1].startswith("-"):
                raise ConfigError("--profile", "needs a profile name, e.g. --profile full")
            profile, i = args[i + 1], i + 2
        elif args[i].startswith("--profile="):
            profile, i = args[i].split("=", 1)[1], i + 1
        else:
            rest.append(args[i])
            i += 1
    return profile, rest


def main(argv: list[str] | None = None) -> None:
    paths = Paths.from_env()
    os.chdir(paths.root)
    try:
        profile, args = _split_profile(list(sys.argv[1:] if argv is None else argv))
        changed = set_profile(paths.params, profile) if profile else False
    except SecureMarkError as exc:
        exit_invalid(exc)
    if profile:
        print(f"profile {profile}: " + ("params.yaml base.profile set" if changed else "already selected in params.yaml"), flush=True)
    if os.environ.get("PREFECT_API_URL"):
        sys.exit(_repro(args, dict(os.environ)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind like Ctrl-C: the server is stopped
    home = paths.root / ".prefect"
    with prefect_server(free_port(), home, log=home / "pipeline-server.log") as url:
        print(f"Prefect server for this run: {url} (log {home / 'pipeline-server.log'})", flush=True)
        code = _repro(args, {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home)})
    sys.exit(code)


if __name__ == "__main__":
    main()
