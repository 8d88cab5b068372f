"""Several processes issuing at once never share a code word."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from securemark.ledger import Ledger

pytestmark = pytest.mark.integration

WORKERS = 4
PER_WORKER = 50
SHARED = [f"shared-{i}" for i in range(10)]

# Each worker opens the (possibly not yet existing) ledger itself, waits for the start
# signal so all writers overlap, then interleaves its own customers with the shared ones.
WORKER = textwrap.dedent(
    """
    import json, sys, time
    from securemark.ledger import Ledger

    path, worker, per_worker, shared, start_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), float(sys.argv[5])
    ledger = Ledger(path, capacity=1000, codebook_id="cb-concurrency")
    time.sleep(max(0.0, start_at - time.time()))
    out = {}
    shared = shared[worker:] + shared[:worker]  # different order per worker
    for i in range(per_worker):
        cid = f"w{worker}-c{i}"
        out[cid] = ledger.assign(cid, "k").codeword_index
        if i % 5 == 0:
            s = shared[(i // 5) % len(shared)]
            out.setdefault(s, []).append(ledger.assign(s, "k").codeword_index)
    print(json.dumps(out))
    """
)


def test_concurrent_processes_never_share_a_code_word(tmp_path):
    path = tmp_path / "ledger.sqlite"
    start_at = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(w), str(PER_WORKER), json.dumps(SHARED), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WORKERS)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))

    ledger = Ledger(path, capacity=1000, codebook_id="cb-concurrency")
    records = ledger.records()
    expected_ids = {f"w{w}-c{i}" for w in range(WORKERS) for i in range(PER_WORKER)} | set(SHARED)
    assert len(records) == len(ledger) == len(expected_ids) == WORKERS * PER_WORKER + len(SHARED)
    assert {r.customer_id for r in records} == expected_ids
    indices = [r.codeword_index for r in records]
    assert indices == list(range(len(records)))  # distinct, and no gaps
    by_customer = {r.customer_id: r.codeword_index for r in records}
    for w, result in enumerate(results):
        for cid, seen in result.items():
            # every answer a worker got agrees with the ledger: shared ids got one index each
            for index in seen if isinstance(seen, list) else [seen]:
                assert index == by_customer[cid], (w, cid)
    shared_seen = {cid for result in results for cid in result if cid in SHARED}
    assert shared_seen == set(SHARED)
