"""What glibc's allocator settings (the Makefile's ``MALLOC_*`` exports) are worth.

Runs two workloads in fresh processes, alternately with glibc's defaults and with the
Makefile's settings (freed memory kept for the next tensor instead of handed back to the
kernel), ``--repeats`` times each, and reports the median seconds of each:

- ``train``: 100 steps of the vendor's model (``model`` params) on ``owner_1``'s images,
  the vendor's optimiser and batch size;
- ``issue``: ``--customers`` copies embedded in one rolling batch
  (``Vendor.embed``, both fingerprints), under the vendor state given by
  ``SECUREMARK_SECRET_FILE`` / ``SECUREMARK_VENDOR_DIR``; customers named
  ``allocator-*`` with code words from the top of the codebook (nothing is registered or
  written to the ledger).

Needs the outputs of ``dvc repro issue``; run from the repository root:

    python benchmarks/allocator.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import report  # noqa: E402  (sibling module: scripts run as python benchmarks/<name>.py)

OUT = Path(__file__).resolve().parent / "results" / "allocator.json"
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184", "MALLOC_TOP_PAD_": "268435456"}

TRAIN = """
import time, torch, torch.nn.functional as F
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from securemark.model import SplitNet
from securemark.storage import read_partition
paths = Paths.from_env(); settings = Settings.load(paths.params)
part = read_partition(paths.partitions / "owner_1")
batch = settings.train.config.batch_size
x, y = part.as_float()[: 100 * batch], part.labels[: 100 * batch]
torch.manual_seed(0)
net = SplitNet(settings.model).train()
cfg = settings.train.config
opt = torch.optim.AdamW(net.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
start = time.perf_counter()
for i in range(0, len(y), batch):
    loss = F.cross_entropy(net(x[i : i + batch]), y[i : i + batch]); opt.zero_grad(); loss.backward(); opt.step()
print(time.perf_counter() - start)
"""

ISSUE = """
import sys, time
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.vendor import open_vendor
paths = Paths.from_env(); settings = Settings.load(paths.params)
vendor = open_vendor(paths, settings)
vendor.carrier_space()
n = int(sys.argv[1]); top = len(vendor.codebook)
start = time.perf_counter()
outcomes = vendor.embed([(f"allocator-{i}", top - 1 - i) for i in range(n)], width=settings.issue.batch)
assert all(o.error is None for o in outcomes), [str(o.error) for o in outcomes if o.error]
print(time.perf_counter() - start)
"""


def run(code: str, args: list[str], tuned: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    if tuned:
        env.update(SETTINGS)
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--customers", type=int, default=20)
    args = ap.parse_args()
    result = {"settings": SETTINGS, "repeats": args.repeats}
    for name, code, extra in (("train_100_steps", TRAIN, []), ("issue", ISSUE, [str(args.customers)])):
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for tuned in (False, True):  # alternate, so a slow spell of the machine hits both
                times[tuned].append(run(code, extra, tuned))
        result[name] = {"default_seconds": statistics.median(times[False]), "tuned_seconds": statistics.median(times[True]),
                        "default_all": times[False], "tuned_all": times[True]}
    result["issue"]["customers"] = args.customers
    report(result, OUT)


if __name__ == "__main__":
    main()
