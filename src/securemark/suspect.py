"""Loading a suspicious model: hostile input, tensors only.

The file comes from an adversary. We never unpickle it:
- ``.safetensors``: parsed by the safetensors library (a JSON header plus raw bytes);
- a PyTorch state dict (``.pt``/``.pth``/``.bin``): read with ``torch.load(weights_only=True)``,
  whose restricted unpickler only rebuilds tensors and plain containers and refuses
  every other global, so a crafted pickle cannot run code.
Then we check what we got against the architecture we expect: every layer present,
no unknown ones, the same shapes, floating dtypes, finite values. Any failure is an
:class:`InvalidModel` with a message meant for a person.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from securemark.errors import InvalidModel
from securemark.model import ModelSpec, SplitNet

NORM_EPS = 1e-5  # the batch norms' epsilon (PyTorch's default, fixed by the architecture)
MAX_BYTES = 512 * 1024 * 1024  # far above any SecureMark model; refuse to read more
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidModel(f"{path.name} is not a readable safetensors file ({exc})") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InvalidModel(
            f"{path.name} contains Python objects other than tensors; refused to unpickle it (it could run code). "
            "Send a safetensors file or a tensor-only state dict"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModel(f"{path.name} is not a readable tensor-only state dict ({first[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InvalidModel(f"{path.name} holds a {type(obj).__name__}; need a mapping of layer names to tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise InvalidModel(f"{path.name}: key {str(key)[:80]!r} is a {type(key).__name__}; need a mapping of layer names to tensors")
        if not isinstance(value, torch.Tensor):
            raise InvalidModel(f"{path.name}: entry {key[:80]!r} is a {type(value).__name__}; need a mapping of layer names to tensors")
    return obj


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a model file as a dict of tensors, refusing anything else."""
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise InvalidModel(f"{path.name} is empty")
    if size > MAX_BYTES:
        raise InvalidModel(f"{path.name} is {size} bytes, more than any SecureMark model ({MAX_BYTES})")
    with open(path, "rb") as f:
        head = f.read(8)
    # safetensors files start with a little-endian u64 header length; zip (torch.save) with PK.
    # Anything else named like a torch file (legacy torch.save, a raw pickle) goes to the
    # restricted loader too, which reads tensors and refuses every other object.
    if path.suffix in SAFETENSORS_SUFFIXES or not (head.startswith(b"PK") or path.suffix in TORCH_SUFFIXES):
        return _read_safetensors(path)
    return _read_state_dict(path)


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor a model of architecture ``spec`` has, with its shape and dtype
    (floating point, except the batch norms' integer counters)."""
    return {k: (v.shape, v.dtype) for k, v in SplitNet(spec).state_dict().items()}


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Validate ``state`` against the expected layers (shape, dtype); returns float32
    copies of the floating tensors and int64 copies of the counters. A batch norm's
    running variance plus its epsilon must be positive (the norm divides by its root)."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InvalidModel(f"missing layers: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise InvalidModel(f"unknown layers (not this architecture): {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    out = {}
    for name, (shape, dtype) in expected.items():
        t = state[name]
        if tuple(t.shape) != tuple(shape):
            raise InvalidModel(f"layer {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not dtype.is_floating_point:  # a counter (batches a norm has seen): unused in evaluation
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise InvalidModel(f"layer {name} has dtype {t.dtype}, expected an integer tensor")
            out[name] = t.detach().to(dtype).contiguous()
            continue
        if not t.is_floating_point():
            raise InvalidModel(f"layer {name} has dtype {t.dtype}, expected a floating-point tensor")
        t = t.detach().to(torch.float32)
        if not torch.isfinite(t).all():
            raise InvalidModel(f"layer {name} contains NaN or Inf")
        if name.endswith("running_var") and bool((t + NORM_EPS <= 0).any()):  # var + eps is what the norm divides by
            raise InvalidModel(f"layer {name} holds a negative variance")
        out[name] = t.contiguous()
    return out


def load_suspect(path: Path, expected: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Read and validate a suspicious model: tensors keyed like ``expected`` (see :func:`check_state`)."""
    return check_state(read_tensors(path), expected)
