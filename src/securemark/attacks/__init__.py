"""Attacks: what a customer (or a coalition of customers) may do to a copy before leaking it.

One registry (:mod:`securemark.attacks.base`), one module per family of attacks:

- :mod:`~securemark.attacks.tuning`: ``fine_tune``, ``retrain``, ``overwrite``;
- :mod:`~securemark.attacks.compression`: ``prune``, ``quantize``;
- :mod:`~securemark.attacks.perturb`: ``noise``;
- :mod:`~securemark.attacks.obfuscate`: ``obfuscate`` (noise where the data does not look);
- :mod:`~securemark.attacks.collusion`: ``average``;
- :mod:`~securemark.attacks.reparam`: ``permute``, ``rescale``;
- :mod:`~securemark.attacks.distill`: ``distill`` (a fresh student imitating the copy);
- :mod:`~securemark.attacks.serving`: ``serve_coalition`` (a coalition's API: random
  member or majority vote per query), ``query_filter`` (an API refusing unusual queries);
- :mod:`~securemark.attacks.invariance`: ``invariance`` (fine-tuning that ignores the published
  key family), ``purify`` (a purifier fitted on the attacker's images in front of the copy);
- :mod:`~securemark.attacks.compose`: ``compose`` (a sequence of the others).

Only the plug-ins live here: scoring attacked models through both channels (the grid the
``attack`` stage runs) is evaluation, :mod:`securemark.evaluation`.
Importing this package registers every attack.
"""

from securemark.attacks.base import OPTIMIZERS, Attack, AttackData, available_attacks, create_attack, register_attack
from securemark.attacks.collusion import Average
from securemark.attacks.compose import Compose
from securemark.attacks.compression import Prune, Quantize
from securemark.attacks.distill import Distill
from securemark.attacks.invariance import Invariance, Purify
from securemark.attacks.obfuscate import Obfuscate
from securemark.attacks.perturb import Noise
from securemark.attacks.reparam import Permute, Rescale
from securemark.attacks.serving import QueryFilter, ServeCoalition
from securemark.attacks.tuning import FineTune, Overwrite, Retrain

__all__ = [
    "OPTIMIZERS",
    "AttackData",
    "Attack",
    "register_attack",
    "create_attack",
    "available_attacks",
    "FineTune",
    "Invariance",
    "Purify",
    "Prune",
    "Average",
    "Quantize",
    "Noise",
    "Overwrite",
    "Retrain",
    "Permute",
    "Rescale",
    "Compose",
    "Distill",
    "Obfuscate",
    "ServeCoalition",
    "QueryFilter",
]
