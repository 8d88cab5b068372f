"""Derived objects persisted in the vendor's private state folder.

What the vendor derives from its base model, its data and its secret (the extractor's
readout and aligner, the drift model, the carrier space) takes seconds to minutes to
compute and never changes for the same inputs. Each is saved once as
``<name>-<digest>.safetensors`` (tensors only, mode 0600, written atomically), where the
digest covers everything it is computed from, so a changed input can only miss the
cache, never read a stale object. A damaged file is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from securemark.private_files import write_private

log = logging.getLogger(__name__)

__all__ = ["file_digest", "folder_digest", "persisted"]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(path: Path) -> str:
    """sha256 over a folder's files (names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for part in sorted(Path(path).rglob("*")):
        if part.is_file():
            digest.update(part.relative_to(path).as_posix().encode() + b"\0" + part.read_bytes())
    return digest.hexdigest()


def persisted(state_dir: Path, name: str, digest: str, build: Callable[[], dict[str, torch.Tensor]],
              check: Callable[[dict[str, torch.Tensor]], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors saved as ``state_dir/<name>-<digest[:16]>.safetensors``, or, when that
    file is missing, damaged or fails ``check``, ``build()``'s, saved there first."""
    path = Path(state_dir) / f"{name}-{digest[:16]}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(str(path))
            if check is None or check(tensors):
                return tensors
            log.warning("the cached %s %s is incomplete; building it again", name, path)
        except Exception as exc:  # a damaged file (an old crash, a disk error): build it again
            log.warning("the cached %s %s is unreadable (%s); building it again", name, path, exc)
    tensors = {k: v.contiguous() for k, v in build().items()}
    write_private(path, lambda handle: handle.write(save(tensors)))
    log.info("%s built and cached in %s", name, path)
    return tensors
