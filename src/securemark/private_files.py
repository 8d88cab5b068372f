"""Files only their owner may read, written so that a crash never leaves half of one.

Vendor state (the codebook cache, the ledger, code words) must never be readable by
other local users, not even for a moment: files are created with mode 0600 from the
start, folders with 0700, and a file is written to a temporary file in the same
folder, flushed to disk and renamed over the old one (atomic on POSIX).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (created, or tightened, to 0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)  # mkdir's mode is masked by the umask, and an old folder may be wider
    return path


def fsync_dir(directory: Path) -> None:
    """Make a rename/link in ``directory`` durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_private(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically with mode 0600: ``write(handle)`` fills a temporary file
    (0600 from creation) in the same folder, which is synced and renamed into place.
    On any failure the old file, if any, is untouched and the temporary file removed."""
    path = Path(path)
    private_dir(path.parent)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def tighten(path: Path) -> None:
    """Make an existing file (e.g. a database another library created) owner-only."""
    path = Path(path)
    if path.exists():
        os.chmod(path, FILE_MODE)
