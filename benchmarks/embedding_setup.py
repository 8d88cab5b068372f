"""What the black-box benchmarks embed copies with: the pipeline's base model, a sample
of its feature bank, the vendor's aux images, the attacker's data and a scratch key (a
random secret, never the vendor's)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from flows.adapters.partitions import attacker_data, test_set
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from securemark.attacks import AttackData
from securemark.fingerprint import EmbedConfig, Readout, carrier_inputs
from securemark.key import projection, random_secret
from securemark.model import SplitNet, accuracy
from securemark.storage import read_partition
from securemark.weights import load_weights


@dataclass(frozen=True, eq=False)
class Scratch:
    settings: Settings
    base: SplitNet
    cfg: EmbedConfig            # the issue stage's embedding settings, ``max_steps`` replaced
    inputs: torch.Tensor        # what the carrying block reads for a fixed sample of the bank
    labels: torch.Tensor
    test: tuple[torch.Tensor, torch.Tensor]
    aux: torch.Tensor
    data: AttackData            # the attacker's own images
    readout: Readout
    key_matrix: torch.Tensor    # a scratch key: ``code_length`` rows over the readout
    code_length: int
    base_accuracy: float


def scratch_setup(max_steps: int) -> Scratch:
    """Everything needs the outputs of ``dvc repro train``; run from the repository root."""
    paths = Paths.from_env()
    settings = Settings.load(paths.params)
    base = load_weights(paths.base_model).eval()
    bank = load_file(str(paths.bank("defended")))
    cfg = dataclasses.replace(settings.fingerprint.embed, max_steps=max_steps)
    pick = torch.randperm(len(bank["labels"]), generator=torch.Generator().manual_seed(0))[: cfg.eval_rows + cfg.train_rows]
    test = test_set(paths)
    aux = read_partition(paths.partition("aux")).as_float()
    readout = Readout.build(cfg.readout, base, cfg.layer, aux[: settings.trace.probe_size], cfg.rank)
    code_length = settings.fingerprint.code.options["code_length"]
    return Scratch(settings, base, cfg, carrier_inputs(base, cfg.layer, bank["features"][pick]), bank["labels"][pick], test, aux,
                   attacker_data(paths, settings), readout,
                   projection(random_secret(), readout.layer, code_length, readout.features(base).numel()), code_length,
                   accuracy(base, *test))
