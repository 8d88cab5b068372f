"""The vendor secret and the fingerprint key derived from it.

The secret is 32 random bytes from :mod:`secrets` (never from a seed), created once and
kept outside the repository and every customer artifact. Everything a customer or a
judge may see refers to it only by its ``key_id``, a one-way hash.

From the secret, each target layer gets a secret projection matrix ``K`` [m, n]
(m = code length, n = flattened weights of the layer); the fingerprint is the sign
pattern of ``K w``. ``K`` is recomputed on demand from HMAC-SHA256(secret, layer, shape),
so nothing but the 32-byte secret has to be stored, and it never touches the global RNG.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import math
import os
import secrets
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from securemark import checks
from securemark.errors import InsecureSecret, SecretError, SecretExists, SecretMissing
from securemark.private_files import fsync_dir

log = logging.getLogger(__name__)

SECRET_BYTES = 32
KEY_ID_DOMAIN = b"securemark-key-id"
KEY_ID_HEX_CHARS = 16


def random_secret() -> bytes:
    """A fresh throwaway secret (32 bytes from :mod:`secrets`), for tests and attackers."""
    return secrets.token_bytes(SECRET_BYTES)


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise SecretError(f"a secret must be bytes, at least 16 of them (create_secret writes {SECRET_BYTES})")
    return bytes(secret)


def key_id(secret: bytes) -> str:
    """Public identifier of ``secret``: first 16 hex chars of sha256("securemark-key-id" + secret).

    Safe to publish in ledgers, model cards and trace reports: the domain prefix keeps it
    unrelated to any other hash of the secret, and the secret cannot be recovered from it.
    """
    return hashlib.sha256(KEY_ID_DOMAIN + _check_secret(secret)).hexdigest()[:KEY_ID_HEX_CHARS]


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700 (existing ones untouched)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:  # created concurrently by someone else: leave it as it is
            continue
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask


def create_secret(path: str | Path) -> str:
    """Generate a new vendor secret, write it hex-encoded to ``path`` (mode 0600); return its key id.

    The file is written to a temporary file in the same directory, synced, then moved in
    place, so a crash never leaves a truncated secret. An existing secret is never
    overwritten (:class:`SecretExists`): every issued copy depends on it.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise SecretExists(f"a secret already exists at {path}; refusing to overwrite it (issued copies depend on it)")
    _make_private_dirs(path.parent)
    secret = random_secret()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secret.hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # atomic and, unlike a rename, fails if the target appeared meanwhile
        except FileExistsError:
            raise SecretExists(f"a secret already exists at {path}; refusing to overwrite it") from None
        except OSError:  # file systems without hard links
            if path.exists():
                raise SecretExists(f"a secret already exists at {path}; refusing to overwrite it") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    kid = key_id(secret)
    log.info("created vendor secret %s (key id %s)", path, kid)
    return kid


def load_secret(path: str | Path) -> bytes:
    """Read the vendor secret written by :func:`create_secret`.

    Refuses (like ssh with private keys) a file that group or others may access, and
    says how to fix a missing, exposed or malformed secret.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SecretMissing(
            f"no vendor secret at {path}; create one once with securemark.key.create_secret({str(path)!r}) "
            "and keep it outside the repository"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"vendor secret {path} is not a regular file")
    if os.name == "posix" and st.st_mode & 0o077:
        raise InsecureSecret(
            f"vendor secret {path} has mode {stat.S_IMODE(st.st_mode):04o}: it must not be accessible by group "
            f"or others; fix it with `chmod 600 {path}` (and consider the secret exposed if others could read it)"
        )
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise SecretError(f"vendor secret {path} is malformed: expected {2 * SECRET_BYTES} hex characters")
    return secret


def _positive_int(name: str, value: int) -> int:
    return checks.integer("key", name, value, 1)


@functools.lru_cache(maxsize=2)
def projection(secret: bytes, layer: str, code_length: int, n_weights: int) -> torch.Tensor:
    """Secret projection matrix float32 [code_length, n_weights], entries i.i.d. N(0, 1/n_weights).

    Seeded from HMAC-SHA256(secret, f"{layer}|{code_length}|{n_weights}") through a local
    ``torch.Generator`` (the global RNG is left alone): the same inputs always give the
    same matrix, another secret or layer an unrelated one. The 1/n_weights variance makes
    each row have unit expected norm, so ``K w`` has the scale of ``w`` whatever the layer size.
    The seed carries 64 bits of the HMAC; the matrix is CPU-generated for reproducibility.
    The last two matrices are kept in this process's memory (a 1024 x 32768 key takes
    about half a second to draw); treat the result as read-only.
    """
    return draw_key(secret, layer, code_length, n_weights)


def draw_key(secret: bytes, layer: str, code_length: int, n_weights: int) -> torch.Tensor:
    """:func:`projection` without keeping the result (for throwaway keys, e.g. null tests)."""
    secret = _check_secret(secret)
    if not isinstance(layer, str) or not layer:
        raise SecretError(f"layer must be a non-empty string, got {layer!r}")
    _positive_int("code_length", code_length)
    _positive_int("n_weights", n_weights)
    message = f"{layer}|{code_length}|{n_weights}".encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "big"))
    matrix = torch.randn(code_length, n_weights, generator=generator, dtype=torch.float32)
    return matrix.mul_(1.0 / math.sqrt(n_weights))


@dataclass(frozen=True)
class FingerprintKey:
    """Public description of one layer's key: which secret (by id), which layer, which shape.

    Holds no secret material, so it can be stored next to the codebook and in MLflow;
    :meth:`matrix` needs the secret itself to rebuild ``K``.
    """

    key_id: str
    layer: str
    code_length: int
    n_weights: int

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not self.key_id:
            raise SecretError(f"key_id must be a non-empty string, got {self.key_id!r}")
        if not isinstance(self.layer, str) or not self.layer:
            raise SecretError(f"layer must be a non-empty string, got {self.layer!r}")
        _positive_int("code_length", self.code_length)
        _positive_int("n_weights", self.n_weights)

    @classmethod
    def for_secret(cls, secret: bytes, layer: str, code_length: int, n_weights: int) -> FingerprintKey:
        """The key of ``layer`` under ``secret`` (fills in the key id)."""
        return cls(key_id(secret), layer, code_length, n_weights)

    def matrix(self, secret: bytes) -> torch.Tensor:
        """The projection ``K`` [code_length, n_weights]; refuses a secret with another key id."""
        actual = key_id(secret)
        if actual != self.key_id:
            raise SecretError(
                f"this fingerprint key belongs to secret {self.key_id}, but the secret given has key id {actual}; "
                "load the vendor secret the copies were issued with"
            )
        return projection(secret, self.layer, self.code_length, self.n_weights)

    def to_dict(self) -> dict:
        """JSON-ready dict (no secret material)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FingerprintKey:
        """Inverse of :meth:`to_dict`; a missing or unknown field is a clear error."""
        expected = {"key_id", "layer", "code_length", "n_weights"}
        if set(data) != expected:
            raise SecretError(
                f"fingerprint key fields must be {sorted(expected)}; "
                f"missing {sorted(expected - set(data))}, unknown {sorted(set(data) - expected)}"
            )
        return cls(**{name: data[name] for name in expected})


def derive_seed(secret: bytes, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` (e.g. "codebook", "embed|customer-7") derived from the
    secret with HMAC-SHA256: reproducible for the vendor, unpredictable for anyone else.
    The codebook is seeded this way so that params.yaml (in git) never determines it."""
    digest = hmac.new(_check_secret(secret), f"seed|{purpose}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def null_secret(seed: int, name: str, index: int) -> bytes:
    """A stand-in secret for null tests: key ``index`` under which the model ``name`` is
    examined to check that no one is accused. Derived from the public ``seed`` (so a
    null test is reproducible) and unrelated to the vendor's secret."""
    return hashlib.sha256(f"null-key|{seed}|{name}|{index}".encode()).digest()
