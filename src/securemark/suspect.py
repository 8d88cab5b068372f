"""Loading a suspicious model: hostile input, tensors only.

The file comes from an adversary. It is read once, bounded (a regular file of at most
``MAX_BYTES``), and its hash is of those bytes. We never unpickle it:
- ``.safetensors``: parsed by the safetensors library (a JSON header plus raw bytes);
- a PyTorch state dict (``.pt``/``.pth``/``.bin``, zip format): bounded first -- stored
  (uncompressed) members only, a bounded expanded size, and every storage its pickle
  declares no larger than the bytes that hold it (the pickle is scanned without
  resolving a single global) -- then read with ``torch.load(weights_only=True)``, whose
  restricted unpickler only rebuilds tensors and plain containers and refuses every
  other global, so a crafted pickle cannot run code. The legacy (pre-zip) format
  cannot be bounded before it is loaded and is refused.
Then we check what we got against the architecture we expect: every layer present,
no unknown ones, the same shapes, floating dtypes, finite values. Any failure is an
:class:`InvalidModel` with a message meant for a person.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from securemark.errors import InvalidModel
from securemark.model import ModelSpec, SplitNet

NORM_EPS = 1e-5  # the batch norms' epsilon (PyTorch's default, fixed by the architecture)
MAX_BYTES = 64 * 1024 * 1024  # a SecureMark model is a few MB; read no more than this
MAX_ENTRIES = 4096  # zip members of a torch file (one per tensor, plus a few)
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# bytes per element of the storages a torch zip file may declare
_STORAGE_BYTES = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
                  "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1}


@dataclass(frozen=True)
class SuspectFile:
    """The bytes of a suspicious model, read once: every check, the parse and the hash
    are of these bytes, so the hash always belongs to what was examined."""

    name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def read_file(path: Path, limit: int = MAX_BYTES) -> SuspectFile:
    """Read a regular file of at most ``limit`` bytes, once. Devices, FIFOs, folders and
    anything larger are refused before reading more than ``limit + 1`` bytes."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InvalidModel(f"{path} does not exist") from None
    except OSError as exc:
        raise InvalidModel(f"{path} cannot be opened ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidModel(f"{path} is not a regular file")
        if info.st_size > limit:
            raise InvalidModel(f"{path.name} is {info.st_size} bytes, more than any SecureMark model ({limit})")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InvalidModel(f"{path.name} grew past {limit} bytes while it was read")
    if not data:
        raise InvalidModel(f"{path.name} is empty")
    return SuspectFile(path.name, data)


def _read_safetensors(file: SuspectFile) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(file.data)
    except Exception as exc:  # untrusted bytes: whatever the parser raises means "not a model"
        raise InvalidModel(f"{file.name} is not a readable safetensors file ({_first_line(exc)})") from None


class _Stub:
    """Stands in for every global a pickle names while it is only *scanned*: calling it,
    building it or setting its state does nothing, so no code of the file runs."""

    def __init__(self, *args, **kwargs) -> None:
        self.name = kwargs.pop("__stub_name__", "")

    def __call__(self, *args, **kwargs) -> "_Stub":
        return _Stub()

    def __setstate__(self, state) -> None:
        pass


class _StorageScanner(pickle.Unpickler):
    """Walks a torch zip file's pickle and collects the storages it declares
    (``('storage', type, key, location, numel)``), resolving no global at all."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: list[tuple[str, str, int]] = []  # (type name, record key, numel)

    def find_class(self, module: str, name: str):
        return _Stub(__stub_name__=name)

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind = pid[1].name if isinstance(pid[1], _Stub) else str(pid[1])
            self.storages.append((kind, str(pid[2]), pid[4] if isinstance(pid[4], int) else -1))
        return _Stub()


def _check_torch_zip(file: SuspectFile, limit: int) -> None:
    """Bound a torch zip file before torch reads it: stored (uncompressed) members only,
    a bounded total, and every storage the pickle declares no larger than its record."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(file.data))
        members = archive.infolist()
    except Exception as exc:  # untrusted bytes: zipfile raises many types on malformed archives
        raise InvalidModel(f"{file.name} is not a readable torch zip file ({_first_line(exc)})") from None
    if len(members) > MAX_ENTRIES:
        raise InvalidModel(f"{file.name} has {len(members)} members; a model has a few dozen")
    if any(m.compress_type != zipfile.ZIP_STORED for m in members):
        raise InvalidModel(f"{file.name} has compressed members; torch.save never compresses, and a compressed "
                           "member cannot be bounded before it is expanded (refused)")
    if sum(m.file_size for m in members) > limit:
        raise InvalidModel(f"{file.name} expands to more than {limit} bytes")
    sizes = {m.filename: m.file_size for m in members}
    pickles = [m.filename for m in members if m.filename.endswith("/data.pkl") or m.filename == "data.pkl"]
    if len(pickles) != 1:
        raise InvalidModel(f"{file.name} is not a torch.save file (no single data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    try:
        scanner = _StorageScanner(archive.read(pickles[0]))
        scanner.load()
    except Exception as exc:  # a malformed pickle: refused without running anything
        raise InvalidModel(f"{file.name} holds a malformed pickle ({_first_line(exc)})") from None
    for kind, key, numel in scanner.storages:
        if kind not in _STORAGE_BYTES:
            raise InvalidModel(f"{file.name} declares a storage of type {kind!r}; only plain tensors are accepted")
        record = sizes.get(f"{prefix}data/{key}")
        if record is None or numel < 0 or numel * _STORAGE_BYTES[kind] > record:
            raise InvalidModel(f"{file.name} declares a storage of {numel} elements that its data (record {key}) does not hold")


def _read_state_dict(file: SuspectFile, limit: int) -> dict[str, torch.Tensor]:
    if not file.data.startswith(b"PK"):
        raise InvalidModel(f"{file.name} is not a zip-format torch file: the legacy format cannot be bounded before "
                           "it is loaded; send a safetensors file or a state dict saved by torch.save (zip format)")
    _check_torch_zip(file, limit)
    try:
        obj = torch.load(io.BytesIO(file.data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InvalidModel(
            f"{file.name} contains Python objects other than tensors; refused to unpickle it (it could run code). "
            "Send a safetensors file or a tensor-only state dict"
        ) from None
    except Exception as exc:  # untrusted bytes: torch's loader raises many types on malformed input
        raise InvalidModel(f"{file.name} is not a readable tensor-only state dict ({_first_line(exc)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InvalidModel(f"{file.name} holds a {type(obj).__name__}; need a mapping of layer names to tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise InvalidModel(f"{file.name}: key {str(key)[:80]!r} is a {type(key).__name__}; need a mapping of layer names to tensors")
        if not isinstance(value, torch.Tensor):
            raise InvalidModel(f"{file.name}: entry {key[:80]!r} is a {type(value).__name__}; need a mapping of layer names to tensors")
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def parse_tensors(file: SuspectFile, suffix: str = "", limit: int = MAX_BYTES) -> dict[str, torch.Tensor]:
    """The tensors of a model file's bytes, refusing anything else. Zip data (what
    ``torch.save`` writes) and files named ``.pt``/``.pth``/``.bin`` go to the bounded
    torch loader; the rest must be safetensors."""
    if suffix in SAFETENSORS_SUFFIXES or not (file.data.startswith(b"PK") or suffix in TORCH_SUFFIXES):
        return _read_safetensors(file)
    return _read_state_dict(file, limit)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a model file as a dict of tensors, refusing anything else."""
    path = Path(path)
    return parse_tensors(read_file(path), path.suffix)


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


def examine(path: Path, expected: dict[str, tuple[torch.Size, torch.dtype]]) -> tuple[dict[str, torch.Tensor], str]:
    """Read a suspicious model once: its validated tensors and the sha256 of exactly the
    bytes they were parsed from."""
    file = read_file(Path(path))
    return check_state(parse_tensors(file, Path(path).suffix), expected), file.sha256
