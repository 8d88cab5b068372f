"""The customer ledger: which customer holds which code word, durably.

Every issued copy carries one code word of the codebook; the ledger is the only record
of who got which, so tracing is worthless without it. It is a SQLite file (stdlib
``sqlite3``) in WAL mode, and every write is a single transaction:

- ``assign`` takes the next free code word inside ``BEGIN IMMEDIATE``, which holds the
  database's write lock from the first read, so two processes issuing at the same time
  can never read the same "next free" index. Assigning a known customer returns its
  first record (idempotent), so a crashed issue can be resumed with the same code word.
- ``complete`` marks the copy issued once its weights exist (model version, hash).

A ``meta`` table pins the codebook id and capacity at creation, so a ledger cannot be
silently reused with another codebook; and, when given, the black-box keys' settings
(``blackbox_id``), since issued copies answer only the keys and words drawn under them.
Rows are never deleted, which makes ``max(codeword_index) + 1`` the smallest unused index.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from securemark.errors import InvalidCustomerId, LedgerError, LedgerFull, LedgerMismatch
from securemark.private_files import FILE_MODE, private_dir, tighten

log = logging.getLogger(__name__)

PENDING = "pending"
ISSUED = "issued"
STATUSES = (PENDING, ISSUED)

MAX_CUSTOMER_ID_LENGTH = 64
_CUSTOMER_ID = re.compile(r"[A-Za-z0-9_.-]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
BUSY_TIMEOUT_S = 30.0

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS customers (
        customer_id TEXT PRIMARY KEY,
        codeword_index INTEGER UNIQUE NOT NULL CHECK (codeword_index >= 0),
        key_id TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('{PENDING}', '{ISSUED}')),
        model_version TEXT,
        weights_sha256 TEXT,
        assigned_at TEXT NOT NULL,
        issued_at TEXT
    )
    """,
)
_COLUMNS = "customer_id, codeword_index, key_id, status, model_version, weights_sha256, assigned_at, issued_at"


@dataclass(frozen=True)
class LedgerRecord:
    """One customer's row: its code word index, key, status and (once issued) copy."""

    customer_id: str
    codeword_index: int
    key_id: str
    status: str
    model_version: str | None
    weights_sha256: str | None
    assigned_at: str
    issued_at: str | None

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready) with the column names as keys."""
        return asdict(self)


def validate_customer_id(customer_id: str) -> str:
    """Return ``customer_id`` if usable, else raise :class:`InvalidCustomerId`.

    Ids end up in MLflow aliases (``customer-<id>``) and file names, so only letters,
    digits, ``-``, ``_`` and ``.`` are allowed, 1 to 64 characters, and not ``.``/``..``.
    """
    if not isinstance(customer_id, str) or not customer_id:
        raise InvalidCustomerId(f"customer id must be a non-empty string, got {customer_id!r}")
    if len(customer_id) > MAX_CUSTOMER_ID_LENGTH:
        raise InvalidCustomerId(
            f"customer id {customer_id[:20]!r}... is {len(customer_id)} characters; the limit is {MAX_CUSTOMER_ID_LENGTH}"
        )
    if not _CUSTOMER_ID.fullmatch(customer_id) or customer_id in (".", ".."):
        raise InvalidCustomerId(
            f"customer id {customer_id!r} may contain only letters, digits, '-', '_' and '.' "
            "(it is used in MLflow alias and file names)"
        )
    return customer_id


def _now() -> str:
    """Current UTC time as ISO-8601 with milliseconds, e.g. 2024-01-01T12:00:00.000+00:00."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _record(row: tuple) -> LedgerRecord:
    return LedgerRecord(*row)


class Ledger:
    """Durable customer -> code word store, safe to share between processes.

    ``Ledger(path, capacity, codebook_id, blackbox_id)`` creates the file (and its
    directory) on first use and records ``capacity`` (number of code words, indices
    ``0..capacity-1``), ``codebook_id`` and ``blackbox_id``; reopening with other values
    raises :class:`LedgerMismatch`. A ledger created without ``blackbox_id`` (or by an
    older version) adopts the first one it is opened with.
    Each call opens its own short-lived connection, so an instance holds no open file
    and may be used from several threads or passed to other processes.
    """

    def __init__(self, path: str | Path, capacity: int, codebook_id: str, blackbox_id: str | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise LedgerError(f"ledger capacity must be a positive integer, got {capacity!r}")
        if not isinstance(codebook_id, str) or not codebook_id:
            raise LedgerError(f"codebook_id must be a non-empty string, got {codebook_id!r}")
        self.path = Path(path)
        self.capacity = capacity
        self.codebook_id = codebook_id
        self.blackbox_id = blackbox_id
        private_dir(self.path.parent)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, FILE_MODE))  # 0600 before SQLite opens it (its journals copy the mode)
        tighten(self.path)  # a ledger created by an older version may be wider
        self._initialise()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, capacity={self.capacity}, codebook_id={self.codebook_id!r})"

    # -- connections and transactions ---------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection in autocommit mode; transactions are opened explicitly."""
        with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as conn:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # FULL: a committed assignment survives power loss, not only a process crash.
            conn.execute("PRAGMA synchronous = FULL")
            yield conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: the write lock is held from the first read."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _initialise(self) -> None:
        """Create the schema and meta on first use; check meta on every later open."""
        with self._connect() as conn:
            # Persistent once set; needs no open transaction, waits on the busy timeout.
            conn.execute("PRAGMA journal_mode = WAL")
        with self._write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            pinned = [("capacity", str(self.capacity)), ("codebook_id", self.codebook_id)]
            if self.blackbox_id is not None:
                pinned.append(("blackbox_id", self.blackbox_id))
            conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", pinned)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("codebook_id") != self.codebook_id:
            raise LedgerMismatch(
                f"ledger {self.path} belongs to codebook {meta.get('codebook_id')!r}, not {self.codebook_id!r}; "
                "use that codebook, or a new ledger file for the new codebook"
            )
        if meta.get("capacity") != str(self.capacity):
            raise LedgerMismatch(
                f"ledger {self.path} was created with capacity {meta.get('capacity')}, not {self.capacity}, "
                f"for codebook {self.codebook_id!r}"
            )
        if self.blackbox_id is not None and meta.get("blackbox_id") != self.blackbox_id:
            raise LedgerMismatch(
                f"ledger {self.path} issued copies that answer the black-box keys {meta.get('blackbox_id')!r}, "
                f"not {self.blackbox_id!r}: tracing by API would read keys those copies never learned; "
                "restore those blackbox settings (params.yaml), or use a new vendor state for the new ones"
            )

    # -- writes ---------------------------------------------------------------------

    def assign(self, customer_id: str, key_id: str) -> LedgerRecord:
        """Give ``customer_id`` a code word index, or return the one it already has.

        Atomic and idempotent: the lookup, the choice of the next free index and the
        insert are one ``BEGIN IMMEDIATE`` transaction, so concurrent callers (threads or
        processes) never share an index, and a repeated call (e.g. resuming after a
        crash) returns the first record unchanged, pending or issued.
        Raises :class:`LedgerFull` when all ``capacity`` code words are taken.
        """
        return self.assign_many([customer_id], key_id)[0]

    def assign_many(self, customer_ids: list[str], key_id: str) -> list[LedgerRecord]:
        """:meth:`assign` for each of ``customer_ids``, in order, in one transaction (all
        or none: a full ledger assigns nothing). One write for a whole batch of customers."""
        for customer_id in customer_ids:
            validate_customer_id(customer_id)
        if not isinstance(key_id, str) or not key_id:
            raise LedgerError(f"key_id must be a non-empty string, got {key_id!r}")
        out, new = [], []
        with self._write() as conn:
            (index,) = conn.execute("SELECT COALESCE(MAX(codeword_index), -1) + 1 FROM customers").fetchone()
            for customer_id in customer_ids:
                row = conn.execute(f"SELECT {_COLUMNS} FROM customers WHERE customer_id = ?", (customer_id,)).fetchone()
                if row is not None:
                    existing = _record(row)
                    if existing.key_id != key_id:
                        log.warning(
                            "customer %s was assigned under key %s; returning that record (asked with key %s)",
                            customer_id, existing.key_id, key_id,
                        )
                    out.append(existing)
                    continue
                if index >= self.capacity:
                    raise LedgerFull(
                        f"ledger {self.path} is full: all {self.capacity} code words of codebook "
                        f"{self.codebook_id!r} are assigned; cannot assign customer {customer_id!r}"
                    )
                record = LedgerRecord(customer_id, index, key_id, PENDING, None, None, _now(), None)
                conn.execute(
                    f"INSERT INTO customers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    tuple(record.to_dict().values()),
                )
                out.append(record)
                new.append(record)
                index += 1
        for record in new:
            log.info("assigned code word %d to customer %s", record.codeword_index, record.customer_id)
        return out

    def complete(self, customer_id: str, model_version: str, weights_sha256: str, reissue: bool = False) -> LedgerRecord:
        """Mark ``customer_id``'s copy as issued: model version and sha256 of its weights.

        Idempotent for the same values; raises :class:`LedgerError` if the customer was
        never assigned, or was already issued with a different version or hash and
        ``reissue`` is False. With ``reissue=True`` (a new base model), the record points
        to the new copy; the customer keeps its code word.
        """
        validate_customer_id(customer_id)
        if not isinstance(model_version, str) or not model_version:
            raise LedgerError(f"model_version must be a non-empty string, got {model_version!r}")
        digest = weights_sha256.lower() if isinstance(weights_sha256, str) else weights_sha256
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise LedgerError(f"weights_sha256 must be 64 hex characters, got {weights_sha256!r}")
        with self._write() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM customers WHERE customer_id = ?", (customer_id,)).fetchone()
            if row is None:
                raise LedgerError(f"customer {customer_id!r} has no code word in {self.path}; call assign() first")
            current = _record(row)
            if current.status == ISSUED:
                if (current.model_version, current.weights_sha256) != (model_version, digest) and not reissue:
                    raise LedgerError(
                        f"customer {customer_id!r} was already issued model {current.model_version!r} "
                        f"(sha256 {current.weights_sha256}); refusing to record {model_version!r} (sha256 {digest})"
                    )
                if (current.model_version, current.weights_sha256) == (model_version, digest):
                    return current
            conn.execute(
                "UPDATE customers SET status = ?, model_version = ?, weights_sha256 = ?, issued_at = ? "
                "WHERE customer_id = ?",
                (ISSUED, model_version, digest, _now(), customer_id),
            )
            row = conn.execute(f"SELECT {_COLUMNS} FROM customers WHERE customer_id = ?", (customer_id,)).fetchone()
        log.info("issued %s to customer %s (code word %d)", model_version, customer_id, current.codeword_index)
        return _record(row)

    # -- reads ----------------------------------------------------------------------

    def get(self, customer_id: str) -> LedgerRecord | None:
        """The customer's record, or None if it was never assigned."""
        validate_customer_id(customer_id)
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM customers WHERE customer_id = ?", (customer_id,)).fetchone()
        return None if row is None else _record(row)

    def records(self, status: str | None = None) -> list[LedgerRecord]:
        """All records (or those with ``status`` 'pending'/'issued'), by code word index."""
        if status is not None and status not in STATUSES:
            raise LedgerError(f"status must be one of {STATUSES} or None, got {status!r}")
        query = f"SELECT {_COLUMNS} FROM customers"
        args: tuple = ()
        if status is not None:
            query += " WHERE status = ?"
            args = (status,)
        with self._connect() as conn:
            rows = conn.execute(query + " ORDER BY codeword_index", args).fetchall()
        return [_record(row) for row in rows]

    def indices(self) -> list[int]:
        """Assigned code word indices, ascending."""
        with self._connect() as conn:
            return [i for (i,) in conn.execute("SELECT codeword_index FROM customers ORDER BY codeword_index")]

    def __len__(self) -> int:
        with self._connect() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM customers").fetchone()
        return count
