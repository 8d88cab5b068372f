"""Several processes issuing at once never share a code word."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from securemark.ledger import Ledger

pytestmark = pytest.mark.integration

WORKERS = 4
PER_WORKER = 50
SHARED = [f"shared-{i}" for i in range(10)]

# Each worker opens the (possibly not yet existing) ledger itself, then waits at a
# barrier (a ready file per worker; go when all exist) so that all writers start
# together, then interleaves its own customers with the shared ones. It reports its
# answers and when its writes began and ended (CLOCK_MONOTONIC, shared by processes).
WORKER = textwrap.dedent(
    """
    import json, pathlib, sys, time
    from securemark.ledger import Ledger

    path, worker, per_worker, shared, barrier, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), pathlib.Path(sys.argv[5]), int(sys.argv[6])
    ledger = Ledger(path, capacity=1000, codebook_id="cb-concurrency")
    (barrier / f"ready-{worker}").touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.glob("ready-*"))) < workers:
        if time.monotonic() > deadline:
            sys.exit("barrier: not every worker became ready")
        time.sleep(0.001)
    out = {}
    shared = shared[worker:] + shared[:worker]  # different order per worker
    began = time.monotonic()
    for i in range(per_worker):
        cid = f"w{worker}-c{i}"
        out[cid] = ledger.assign(cid, "k").codeword_index
        if i % 5 == 0:
            s = shared[(i // 5) % len(shared)]
            out.setdefault(s, []).append(ledger.assign(s, "k").codeword_index)
    print(json.dumps({"answers": out, "began": began, "ended": time.monotonic()}))
    """
)


def test_concurrent_processes_never_share_a_code_word(tmp_path):
    path = tmp_path / "ledger.sqlite"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(w), str(PER_WORKER), json.dumps(SHARED), str(barrier), str(WORKERS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WORKERS)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    results = [r["answers"] for r in reports]
    # the writers really ran at the same time: every one began before any one ended
    assert max(r["began"] for r in reports) < min(r["ended"] for r in reports)

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
    # Commit order is the scheduler's, not the ledger's contract: SQLite's busy handler can
    # let one writer commit a burst while the others sleep, so the records need not
    # interleave (CI once saw four clean blocks). The overlap asserted above is what makes
    # the writers contend; every process saw the others' writes, or it would have reused an
    # index, which the checks above rule out.
