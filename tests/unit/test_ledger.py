"""Customer ledger: idempotent assignment, capacity, completion, crash recovery."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from securemark.errors import InvalidCustomerId, LedgerError, LedgerFull, LedgerMismatch
from securemark.ledger import Ledger, LedgerRecord

SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "vendor" / "ledger.sqlite", capacity=5, codebook_id="tardos-abc")


def test_creates_file_in_wal_mode_with_meta(tmp_path):
    path = tmp_path / "a" / "b" / "ledger.sqlite"
    Ledger(path, capacity=7, codebook_id="cb-1")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert dict(conn.execute("SELECT key, value FROM meta")) == {"capacity": "7", "codebook_id": "cb-1"}


def test_assign_is_idempotent_and_sequential(ledger):
    first = ledger.assign("alice", "key1")
    assert first.status == "pending" and first.codeword_index == 0
    assert first.model_version is None and first.weights_sha256 is None and first.issued_at is None
    assert ledger.assign("alice", "key1") == first
    assert [ledger.assign(c, "key1").codeword_index for c in ("bob", "carol", "dave")] == [1, 2, 3]
    assert ledger.assign("bob", "key1").codeword_index == 1
    assert ledger.indices() == [0, 1, 2, 3]
    assert len(ledger) == 4


def test_full_ledger_refuses_new_customers_but_returns_known_ones(ledger):
    for i in range(5):
        ledger.assign(f"c{i}", "k")
    with pytest.raises(LedgerFull, match="all 5 code words"):
        ledger.assign("late", "k")
    assert ledger.get("late") is None
    assert ledger.assign("c3", "k").codeword_index == 3
    assert len(ledger) == 5


def test_complete_get_and_records(ledger):
    ledger.assign("alice", "k")
    ledger.assign("bob", "k")
    done = ledger.complete("bob", "base-v1", SHA_A.upper())
    assert done.status == "issued" and done.model_version == "base-v1" and done.weights_sha256 == SHA_A
    assert done.issued_at is not None and done.issued_at.endswith("+00:00")
    assert ledger.complete("bob", "base-v1", SHA_A) == done  # same values: idempotent
    with pytest.raises(LedgerError, match="already issued"):
        ledger.complete("bob", "base-v2", SHA_B)
    with pytest.raises(LedgerError, match="assign"):
        ledger.complete("zed", "base-v1", SHA_A)
    with pytest.raises(LedgerError, match="64 hex"):
        ledger.complete("alice", "base-v1", "not-a-hash")
    assert ledger.get("bob") == done
    assert ledger.get("nobody") is None
    assert [r.customer_id for r in ledger.records()] == ["alice", "bob"]
    assert [r.customer_id for r in ledger.records("pending")] == ["alice"]
    assert [r.customer_id for r in ledger.records("issued")] == ["bob"]
    with pytest.raises(LedgerError, match="status"):
        ledger.records("lost")
    assert ledger.assign("bob", "k") == done  # assigning an issued customer returns the issued record


def test_record_to_dict_has_every_column(ledger):
    record = ledger.assign("alice", "k")
    data = record.to_dict()
    assert list(data) == [
        "customer_id", "codeword_index", "key_id", "status",
        "model_version", "weights_sha256", "assigned_at", "issued_at",
    ]
    assert LedgerRecord(**data) == record


@pytest.mark.parametrize("bad", ["", "a b", "../etc", "x/y", "é", "a" * 65, ".", "..", "semi;colon", None, 3])
def test_bad_customer_ids_are_rejected(ledger, bad):
    with pytest.raises(InvalidCustomerId):
        ledger.assign(bad, "k")
    assert len(ledger) == 0


@pytest.mark.parametrize("good", ["a", "Customer-01", "acme_corp.eu", "x" * 64])
def test_good_customer_ids_are_accepted(ledger, good):
    assert ledger.assign(good, "k").customer_id == good


def test_reopen_with_other_codebook_or_capacity_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path, capacity=5, codebook_id="cb-1").assign("alice", "k")
    with pytest.raises(LedgerMismatch, match="cb-1"):
        Ledger(path, capacity=5, codebook_id="cb-2")
    with pytest.raises(LedgerMismatch, match="capacity"):
        Ledger(path, capacity=6, codebook_id="cb-1")
    reopened = Ledger(path, capacity=5, codebook_id="cb-1")
    assert reopened.get("alice").codeword_index == 0


def test_reopen_with_other_blackbox_keys_is_refused(tmp_path):
    """Copies answer the keys they were issued with: other key settings are refused,
    and a ledger from before the pin adopts the first settings it is opened with."""
    path = tmp_path / "ledger.sqlite"
    Ledger(path, capacity=5, codebook_id="cb", blackbox_id="natural-keys=256").assign("alice", "k")
    with pytest.raises(LedgerMismatch, match="natural-keys=256"):
        Ledger(path, capacity=5, codebook_id="cb", blackbox_id="natural-keys=512")
    assert Ledger(path, capacity=5, codebook_id="cb", blackbox_id="natural-keys=256").get("alice").codeword_index == 0
    older = tmp_path / "older.sqlite"
    Ledger(older, capacity=5, codebook_id="cb").assign("bob", "k")
    Ledger(older, capacity=5, codebook_id="cb", blackbox_id="patterns=64x8")
    with pytest.raises(LedgerMismatch, match="patterns=64x8"):
        Ledger(older, capacity=5, codebook_id="cb", blackbox_id="natural-keys=256")


def test_constructor_rejects_bad_capacity(tmp_path):
    with pytest.raises(LedgerError, match="capacity"):
        Ledger(tmp_path / "l.sqlite", capacity=0, codebook_id="cb")


def test_crash_between_assign_and_complete_resumes_with_same_code_word(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, capacity=5, codebook_id="cb")
    ledger.assign("early", "k")
    child = textwrap.dedent(
        f"""
        import os
        from securemark.ledger import Ledger
        ledger = Ledger({str(path)!r}, capacity=5, codebook_id="cb")
        ledger.assign("victim", "k")
        os._exit(1)  # crash before complete()
        ledger.complete("victim", "v1", "{SHA_A}")
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    pending = ledger.records("pending")
    assert [(r.customer_id, r.codeword_index) for r in pending] == [("early", 0), ("victim", 1)]
    assert ledger.records("issued") == []
    resumed = ledger.assign("victim", "k")
    assert resumed == ledger.get("victim") and resumed.codeword_index == 1 and resumed.status == "pending"
    done = ledger.complete("victim", "v1", SHA_A)
    assert done.status == "issued" and done.codeword_index == 1
    assert ledger.indices() == [0, 1]
