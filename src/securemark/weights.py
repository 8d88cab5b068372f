"""Model weights on disk: safetensors only (raw tensors, no pickle).

A weights file carries the architecture (:class:`ModelSpec`) in its metadata, so a
copy can be rebuilt from the file alone. Nothing else goes in: no key, no code word,
no optimiser state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from securemark.model import ModelSpec, SplitNet

SPEC_KEY = "securemark.spec"


def state_of(model: SplitNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(model: SplitNet, path: Path) -> Path:
    """Write ``model`` as safetensors with its spec in the metadata. Atomic (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {SPEC_KEY: json.dumps(model.spec.to_dict())}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state_of(model), str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_spec(path: Path) -> ModelSpec:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    raw = json.loads(meta[SPEC_KEY])
    return ModelSpec(**raw)


def load_weights(path: Path) -> SplitNet:
    """Rebuild a trusted model (our own artifacts) from a weights file."""
    spec = read_spec(path)
    model = SplitNet(spec)
    with safe_open(str(path), framework="pt") as f:
        model.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    return model


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
