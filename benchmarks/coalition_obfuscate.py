"""The attack aimed at the drift-whitened reading: average 8 copies, fine-tune one epoch, and
add noise in the directions the attacker's own data barely excites (``obfuscate``, which is
where natural updates do not go and the whitened reading therefore listens hardest), in
either order. Prints one line per attacked model (accuracy, colluders caught, what each
reading accused). Uses the pipeline's copies and vendor state; run from the repository root:

    python benchmarks/coalition_obfuscate.py | tee benchmarks/results/coalition_obfuscate.log
"""
import sys
import numpy as np, torch
sys.path.insert(0, ".")
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.vendor import Vendor, make_extractor
from flows.adapters.partitions import attacker_data, test_set
from flows.attack import load_copies
from securemark.attacks import create_attack
from securemark.attacks.grid import draw_coalitions
from securemark.model import accuracy
from securemark.tracing import codebook_indices, decide_readings
torch.set_num_threads(2)
paths = Paths.from_env(); settings = Settings.load(paths.params)
vendor = Vendor.open(paths, settings); ex = make_extractor(paths, settings, vendor)
cw = vendor.issued_codewords(); copies = load_copies(paths, sorted(cw), "files")
data, test = attacker_data(paths, settings), test_set(paths)
cb = vendor.codebook; idx = codebook_indices(cb)
rng = np.random.default_rng(5)
coals = draw_coalitions(rng, sorted(copies), 8, 2)
for dirs in [392, 128]:
    for scale in [1.0, 3.0, 10.0]:
        for order in ["ft_then_obf", "obf_then_ft"]:
            obf = {"attack": "obfuscate", "layers": ["server.dense1"], "directions": dirs, "scale": scale, "samples": 2500}
            steps = [{"attack": "average"}] + ([{"attack": "fine_tune", "epochs": 1}, obf] if order == "ft_then_obf" else [obf, {"attack": "fine_tune", "epochs": 1}])
            att = create_attack("compose", steps=steps)
            for t, coal in enumerate(coals):
                m = att([copies[c] for c in coal], data, torch.Generator().manual_seed(t))
                a, _ = ex.aligned(m)
                v = decide_readings(ex.readings(a), cb, idx, 1e-6, "correlation", "peeling")
                g = {cw[c] for c in coal}; acc = {x.codeword_index for x in v.accused}
                print(f"c=8 dirs={dirs} scale={scale} {order} t={t} acc={accuracy(m, *test):.4f} caught={len(acc & g)} inn={len(acc - g)} {v.readings}", flush=True)
