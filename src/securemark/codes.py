"""Fingerprinting code families: one binary code word per customer (pure numpy).

A family turns ``(capacity, seed)`` into a :class:`Codebook`: ``capacity`` code words
of ``length`` bits, bit-packed so that a million customers fit in memory, plus the
per-position bias ``p_i = P(bit = 1)`` that the tracer needs to centre scores.

Families are plug-ins registered by name (``@register_code("tardos")``) and built with
``create_code(name, **cfg)``:

- ``tardos`` (default): the binary symmetric Tardos code (Skoric, Katzenbeisser, Celik
  2008). Positions are independent, which is what gives the tracer its provable
  false-accusation bound (see :mod:`securemark.scoring`).
- ``bibd``: the BIBD AND-anti-collusion code of DeepMarks (Chen et al. 2019), built
  from the projective plane PG(2, q). Kept for comparison; its positions are *not*
  independent, so the distribution-free threshold of :mod:`securemark.scoring` is a
  heuristic for it, not a guarantee.
- ``random``: uniform random words (``p_i = 1/2``), a baseline.

Randomness is explicit: every code book is a function of ``(family params, capacity,
seed)`` only, and the first ``k`` words of a code book do not depend on ``capacity``
(a larger code book extends a smaller one issued with the same seed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from securemark import checks
from securemark.errors import InvalidConfig, InvalidInput
from securemark.private_files import write_private
from securemark.registry import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "Codebook",
    "CodeFamily",
    "TardosCode",
    "BibdCode",
    "RandomCode",
    "register_code",
    "create_code",
    "available_codes",
]

_FORMAT_VERSION = 1
# Bits drawn per chunk when generating: bounds memory (a uint32 per bit, so 32 MiB)
# and, being fixed, makes the chunking -- hence the code book -- independent of the
# number of worker threads.
_CHUNK_BITS = 1 << 23
# Biases are quantised to multiples of 2**-32 so that comparing a uniform uint32
# with ``round(p * 2**32)`` draws a bit with probability *exactly* the stored bias.
_BIAS_SCALE = 1 << 32


def _workers() -> int:
    """Threads for chunked generation (numpy's generators release the GIL)."""
    return max(1, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------- codebook


@dataclass(frozen=True, eq=False)
class Codebook:
    """Code words of ``len(self)`` customers, ``length`` bits each.

    Attributes:
        family: name of the code family that generated it (a registry key).
        length: code length m in bits.
        packed: uint8 [n, ceil(m / 8)], row j is customer j's word packed with
            ``np.packbits(..., axis=1, bitorder="little")`` (bit i of the word is bit
            ``i % 8`` of byte ``i // 8``); padding bits are zero. Marked read-only.
        biases: float64 [m], ``P(bit_i = 1)`` for the word of a customer drawn from the
            code's distribution; the tracer centres every symbol with it.
        seed: seed the code book was generated from (reproducibility, audit).
        params: the family's parameters (JSON-serialisable), for the record.
    """

    family: str
    length: int
    packed: np.ndarray
    biases: np.ndarray
    seed: int
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.length, (int, np.integer)) or self.length < 1:
            raise InvalidInput(f"length: must be a positive integer, got {self.length!r}")
        n_bytes = math.ceil(self.length / 8)
        if not isinstance(self.packed, np.ndarray) or self.packed.dtype != np.uint8 or self.packed.ndim != 2 or self.packed.shape[1] != n_bytes:
            raise InvalidInput(
                f"packed: need uint8 [n, {n_bytes}] for length {self.length}, "
                f"got {self.packed.dtype} {self.packed.shape}"
            )
        biases = np.asarray(self.biases, dtype=np.float64)
        if biases.shape != (self.length,):
            raise InvalidInput(f"biases: need shape ({self.length},), got {biases.shape}")
        self.packed.setflags(write=False)
        object.__setattr__(self, "biases", biases)
        biases.setflags(write=False)

    def __len__(self) -> int:
        return int(self.packed.shape[0])

    @property
    def n_bytes(self) -> int:
        """Bytes per packed code word."""
        return int(self.packed.shape[1])

    def words(self, indices: Any) -> np.ndarray:
        """Unpacked code words of ``indices`` (anything numpy can index rows with).

        Returns:
            uint8 [k, m] of 0/1.
        """
        rows = np.atleast_2d(self.packed[indices])
        return np.unpackbits(rows, axis=1, count=self.length, bitorder="little")

    def word(self, index: int) -> np.ndarray:
        """Unpacked code word of one customer, uint8 [m] of 0/1."""
        return self.words([int(index)])[0]

    def save(self, path: str | Path) -> None:
        """Write the code book as an ``.npz`` that loads without pickle: atomically (a
        crash never leaves a truncated cache) and readable by its owner only, from the start."""
        write_private(Path(path), self._write)

    def _write(self, handle) -> None:
        np.savez(
            handle,
            format_version=np.int64(_FORMAT_VERSION),
            family=np.str_(self.family),
            length=np.int64(self.length),
            packed=self.packed,
            biases=self.biases,
            seed=np.int64(self.seed),
            params=np.str_(json.dumps(self.params, sort_keys=True)),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Codebook":
        """Read a code book written by :meth:`save` (never unpickles)."""
        with np.load(path, allow_pickle=False) as data:
            version = int(data["format_version"])
            if version != _FORMAT_VERSION:
                raise InvalidInput(f"{path}: unsupported code book format version {version}")
            return cls(
                family=str(data["family"]),
                length=int(data["length"]),
                packed=np.array(data["packed"], dtype=np.uint8),
                biases=np.array(data["biases"], dtype=np.float64),
                seed=int(data["seed"]),
                params=json.loads(str(data["params"])),
            )


# --------------------------------------------------------------------------- registry


class CodeFamily(Protocol):
    """What every code family provides."""

    def generate(self, capacity: int, seed: int) -> Codebook:
        """``capacity`` code words, reproducible from ``seed``."""
        ...


_CODES: Registry[type] = Registry("code family")
register_code = _CODES.register  # class decorator: make a family available as create_code(name, ...)
available_codes = _CODES.names  # names of the registered code families, sorted


def create_code(name: str, **cfg: Any) -> CodeFamily:
    """Build the code family registered as ``name`` with parameters ``cfg``.

    Raises:
        UnknownName: unknown family (the message lists the valid names).
        InvalidConfig: unknown parameter, or an invalid parameter value (the message names it).
    """
    return _CODES.create(name, **cfg)


# --------------------------------------------------------------------------- helpers


def _check_int(name: str, value: Any, minimum: int) -> None:
    checks.integer("code", name, value, minimum)


def _check_capacity_seed(capacity: int, seed: int) -> None:
    _check_int("capacity", capacity, 1)
    _check_int("seed", seed, 0)


def _bits_stream(seed: int, stream: int, chunk: int) -> np.random.Generator:
    """Independent generator for one chunk of one stream of a code book.

    Keyed by (seed, stream, chunk) so that chunks can be drawn in any order, on any
    number of threads, and still give the same code book.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(stream, chunk))))


def _bernoulli_packed(thresholds: np.ndarray, capacity: int, seed: int) -> np.ndarray:
    """Bit-packed Bernoulli words: bit i is 1 iff a uniform uint32 < ``thresholds[i]``.

    Args:
        thresholds: uint32 [m], ``P(bit_i = 1) = thresholds[i] / 2**32`` exactly.
        capacity: number of rows (customers).
        seed: code book seed.

    Returns:
        uint8 [capacity, ceil(m / 8)], rows packed little-endian.
    """
    m = thresholds.shape[0]
    rows_per_chunk = max(1, _CHUNK_BITS // m)
    n_chunks = math.ceil(capacity / rows_per_chunk)
    packed = np.empty((capacity, math.ceil(m / 8)), dtype=np.uint8)

    def fill(chunk: int) -> None:
        start = chunk * rows_per_chunk
        rows = min(rows_per_chunk, capacity - start)
        uniform = _bits_stream(seed, 1, chunk).integers(0, _BIAS_SCALE, size=(rows, m), dtype=np.uint32)
        packed[start : start + rows] = np.packbits(uniform < thresholds, axis=1, bitorder="little")

    with ThreadPoolExecutor(max_workers=min(_workers(), n_chunks)) as pool:
        list(pool.map(fill, range(n_chunks)))
    return packed


# --------------------------------------------------------------------------- families


@register_code("tardos")
@dataclass(frozen=True)
class TardosCode:
    """Binary symmetric Tardos code (Skoric, Katzenbeisser, Celik 2008).

    Each position i gets a bias ``p_i = sin^2(r_i)`` with ``r_i`` uniform on
    ``[t', pi/2 - t']`` and ``sin^2(t') = t``: the arcsine density of Tardos (2003)
    with cut-off ``t``, so every ``p_i`` lies in ``[t, 1 - t]``. The biases are drawn
    once per code book from the seed; customer j's bit i is Bernoulli(p_i),
    independently over customers and positions.

    Biases are rounded to multiples of 2**-32 (a change below 1e-9) so that the stored
    biases are the *exact* probabilities the bits were drawn with.

    Attributes:
        code_length: m, bits per code word.
        max_colluders: c0, the coalition size the code is designed against; sets the
            default cut-off.
        epsilon: target false-accusation probability the code is designed for;
            recorded in the code book so that tracing can use it as its default.
        cutoff: t in (0, 1/2); None means Tardos' ``1 / (300 * c0)``.
    """

    code_length: int = 304
    max_colluders: int = 4
    epsilon: float = 1e-6
    cutoff: float | None = None

    def __post_init__(self) -> None:
        _check_int("code_length", self.code_length, 1)
        _check_int("max_colluders", self.max_colluders, 1)
        checks.number("code family 'tardos'", "epsilon", self.epsilon, 0.0, 1.0, low_open=True, high_open=True)
        if self.cutoff is not None:
            checks.number("code family 'tardos'", "cutoff", self.cutoff, 0.0, 0.5, low_open=True, high_open=True)

    @property
    def t(self) -> float:
        """Effective cut-off t: every bias lies in [t, 1 - t]."""
        return float(self.cutoff) if self.cutoff is not None else 1.0 / (300.0 * self.max_colluders)

    def biases(self, seed: int) -> np.ndarray:
        """The m biases of the code book with this ``seed`` (float64, exact multiples of 2**-32)."""
        t_prime = math.asin(math.sqrt(self.t))
        r = _bits_stream(seed, 0, 0).uniform(t_prime, math.pi / 2 - t_prime, size=self.code_length)
        lowest = math.ceil(self.t * _BIAS_SCALE)
        highest = math.floor((1.0 - self.t) * _BIAS_SCALE)
        scaled = np.clip(np.rint(np.sin(r) ** 2 * _BIAS_SCALE), lowest, highest)
        return scaled / _BIAS_SCALE

    def generate(self, capacity: int, seed: int) -> Codebook:
        """``capacity`` Tardos code words of ``code_length`` bits, reproducible from ``seed``."""
        _check_capacity_seed(capacity, seed)
        biases = self.biases(seed)
        thresholds = (biases * _BIAS_SCALE).astype(np.uint32)  # exact: biases are on the grid
        packed = _bernoulli_packed(thresholds, int(capacity), int(seed))
        params = {**dataclasses.asdict(self), "cutoff": self.t}
        logger.debug("tardos code book: %d x %d bits, t=%.3g, seed=%d", capacity, self.code_length, self.t, seed)
        return Codebook("tardos", self.code_length, packed, biases, int(seed), params)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def projective_plane_incidence(q: int) -> np.ndarray:
    """Incidence matrix of the projective plane PG(2, q) for a prime q.

    Points and lines are the normalised non-zero vectors of GF(q)^3 (first non-zero
    coordinate 1); point x lies on line l iff ``x . l = 0 (mod q)``. The result is a
    symmetric (v, k, lambda) = (q^2+q+1, q+1, 1) design: every line has q+1 points,
    every point is on q+1 lines, and two distinct lines meet in exactly one point.

    Returns:
        uint8 [v, v], rows = points, columns = lines (blocks).
    """
    vectors = [(1, a, b) for a in range(q) for b in range(q)] + [(0, 1, b) for b in range(q)] + [(0, 0, 1)]
    coords = np.array(vectors, dtype=np.int64)
    return ((coords @ coords.T) % q == 0).astype(np.uint8)


@register_code("bibd")
@dataclass(frozen=True)
class BibdCode:
    """BIBD AND-anti-collusion code of DeepMarks (Chen et al. 2019).

    Supported designs: the projective planes PG(2, q) for a prime ``order`` q, i.e.
    (v, k, lambda) = (q^2 + q + 1, q + 1, 1). The code length is v and at most v
    customers can be served (one block each). A customer's word is the complement of
    its block's incidence column: q^2 ones and q + 1 zeros, and any two words share
    exactly lambda = 1 zero. Under an AND (or averaging) collusion the positions that
    stay 0 identify the coalition.

    ``biases`` are the column densities of the full design, q^2 / v at every position:
    the bit probability for a customer whose block is uniformly random. Bits within a
    word are dependent (exactly q + 1 zeros), unlike Tardos.

    Attributes:
        order: q, a prime (2, 3, 5, 7, 11, 13, 17, 19, 23, ...). Default 17 gives
            length 307, comparable to the default Tardos length 304.
    """

    order: int = 17

    def __post_init__(self) -> None:
        _check_int("order", self.order, 2)
        if not _is_prime(int(self.order)):
            raise InvalidConfig(f"code family 'bibd': order must be a prime (PG(2, q) for prime q), got {self.order!r}")

    @property
    def code_length(self) -> int:
        """v = q^2 + q + 1."""
        q = int(self.order)
        return q * q + q + 1

    def generate(self, capacity: int, seed: int) -> Codebook:
        """Words for ``capacity <= v`` customers; ``seed`` permutes blocks over customers."""
        _check_capacity_seed(capacity, seed)
        v = self.code_length
        if capacity > v:
            raise InvalidConfig(f"code family 'bibd': capacity: PG(2, {self.order}) serves at most v = {v} customers, got {capacity}")
        incidence = projective_plane_incidence(int(self.order))  # [points, blocks]
        blocks = _bits_stream(int(seed), 0, 0).permutation(v)[:capacity]
        words = 1 - incidence[:, blocks].T  # [capacity, v]: complement of each block
        packed = np.packbits(words, axis=1, bitorder="little")
        biases = (1 - incidence).mean(axis=1, dtype=np.float64)
        return Codebook("bibd", v, packed, biases, int(seed), {"order": int(self.order)})


@register_code("random")
@dataclass(frozen=True)
class RandomCode:
    """Uniform random code words: every bit independent, P(1) = 1/2.

    Attributes:
        code_length: m, bits per code word.
    """

    code_length: int = 304

    def __post_init__(self) -> None:
        _check_int("code_length", self.code_length, 1)

    def generate(self, capacity: int, seed: int) -> Codebook:
        """``capacity`` uniform random words of ``code_length`` bits, reproducible from ``seed``."""
        _check_capacity_seed(capacity, seed)
        m = int(self.code_length)
        thresholds = np.full(m, _BIAS_SCALE // 2, dtype=np.uint32)
        packed = _bernoulli_packed(thresholds, int(capacity), int(seed))
        biases = np.full(m, 0.5)
        return Codebook("random", m, packed, biases, int(seed), {"code_length": m})
