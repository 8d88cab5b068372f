"""What a vendor is configured with: where its state lives, and the core configs of the
code, the black-box keys and the reading of suspects.

The entry points build these from ``params.yaml`` (``flows.adapters.settings``); the
core validates them here, so a bad value fails before any work starts, naming its key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from securemark import checks
from securemark.attacks import create_attack
from securemark.codes import create_code
from securemark.errors import ConfigError
from securemark.fingerprint import EmbedConfig
from securemark.model import NUM_CLASSES, ModelSpec
from securemark.scoring import available_scorers
from securemark.tracing import available_decoders
from securemark.tracing.blackbox import FAMILIES

__all__ = ["BlackboxConfig", "CodeConfig", "TraceConfig", "VendorConfig", "VendorFiles", "recipe_options"]


def recipe_options(recipe: dict[str, Any]) -> dict[str, Any]:
    """An attack recipe's own options (everything but its ``attack`` name)."""
    return {k: v for k, v in recipe.items() if k != "attack"}


@dataclass(frozen=True)
class CodeConfig:
    """The code family, how many customers the codebook holds, and the family's options."""

    family: str = "random"
    capacity: int = 1000
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks.integer("fingerprint.code", "capacity", self.capacity, 1)
        create_code(self.family, **self.options)  # unknown family or option: fail now



@dataclass(frozen=True)
class BlackboxConfig:
    """The black-box fingerprint: secret key images a copy answers with its customer's
    labels (:mod:`securemark.tracing.blackbox`), and how tracing queries a prediction API."""

    enabled: bool = True             # teach every issued copy its black-box code word
    family: str = "patterns"         # patterns: secret block patterns blended into aux images | natural: unsure aux images
    natural_keys: int = 512          # natural: keys = binary symbols (the base's top class or runner-up)
    natural_pool: float = 2.0        # natural: drawn from the natural_pool x natural_keys aux images the base is least sure of
    flip_share: float = 0.5          # natural: probability a word's symbol is the runner-up (0.5: uniform words; less: sparse)
    patterns: int = 64               # secret patterns = symbols (classes) of a black-box word
    per_pattern: int = 8             # aux images each pattern is blended into (keys = patterns * per_pattern)
    blend: float = 0.4               # key = (1 - blend) * aux image + blend * pattern
    cells: int = 7                   # a pattern is cells x cells random blocks scaled up to 28 x 28
    views: int = 1                   # each key and views - 1 perturbed copies of it are taught
    checkpoints: tuple[int, ...] = (64, 128, 256, 512)  # sequential test: queries after which a trace may stop
    repeats: int = 1                 # queries of each key (a coalition may route each query to another copy)
    explain: float = 0.0             # > 0: read on after an accusation until the accused explain this share of the answers
    batch: int = 64                  # images per HTTP request
    timeout: float = 10.0            # seconds per request
    retries: int = 3                 # per request, with exponential back-off (and Retry-After on 429)
    max_response_bytes: int = 1_000_000
    null_secrets: int = 10           # blackbox stage: other vendors' keys every served model is also scored under
    cost_copies: int = 5             # blackbox stage: copies re-embedded without the black-box marks (their cost)
    distill_trials: int = 2          # blackbox stage: copies distilled (hard labels) through their API

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        checks.choice("blackbox", "family", self.family, FAMILIES)
        checks.integer("blackbox", "natural_keys", self.natural_keys, 1)
        checks.number("blackbox", "natural_pool", self.natural_pool, 1.0)
        checks.number("blackbox", "flip_share", self.flip_share, 0.0, 0.5, low_open=True)
        checks.integer("blackbox", "patterns", self.patterns, 1)
        checks.integer("blackbox", "per_pattern", self.per_pattern, 1)
        checks.number("blackbox", "blend", self.blend, 0.0, 1.0, low_open=True, high_open=True)
        checks.integer("blackbox", "cells", self.cells, 1, 28)
        checks.integer("blackbox", "views", self.views, 1)
        checks.integer("blackbox", "repeats", self.repeats, 1)
        checks.number("blackbox", "explain", self.explain, 0.0, 1.0)
        checks.integer("blackbox", "batch", self.batch, 1, 1024)
        checks.number("blackbox", "timeout", self.timeout, 0.0, low_open=True)
        checks.integer("blackbox", "retries", self.retries, 0, 10)
        checks.integer("blackbox", "max_response_bytes", self.max_response_bytes, 1024)
        checks.integer("blackbox", "null_secrets", self.null_secrets, 0)
        checks.integer("blackbox", "cost_copies", self.cost_copies, 0)
        checks.integer("blackbox", "distill_trials", self.distill_trials, 0)
        if not self.checkpoints or list(self.checkpoints) != sorted(set(self.checkpoints)) or self.checkpoints[-1] > self.keys:
            raise ConfigError("blackbox.checkpoints", f"need increasing query counts up to the number of keys ({self.keys}), got {list(self.checkpoints)}")
        for c in self.checkpoints:
            checks.integer("blackbox", "checkpoints[]", c, 1)

    @property
    def keys(self) -> int:
        """Key images: every pattern blended into ``per_pattern`` aux images, or the natural keys."""
        return self.natural_keys if self.family == "natural" else self.patterns * self.per_pattern

    @property
    def symbols(self) -> int:
        """Symbols of a black-box word: one per pattern, or one per natural key."""
        return self.natural_keys if self.family == "natural" else self.patterns

    @property
    def q(self) -> int:
        """Values a symbol takes: a class, or one of a natural key's two candidate classes."""
        return 2 if self.family == "natural" else NUM_CLASSES

    @property
    def prior(self) -> tuple[float, ...] | None:
        """The words' symbol prior: natural keys with ``flip_share`` below one half draw
        the runner-up with that probability (sparse words); otherwise uniform (``None``)."""
        if self.family != "natural" or self.flip_share == 0.5:
            return None
        return (1.0 - self.flip_share, self.flip_share)

    @property
    def identity(self) -> str:
        """The settings that fix the keys and the words (not how copies are taught or
        APIs queried): issued copies answer only the keys and words drawn under these,
        so the ledger pins them (:class:`securemark.ledger.Ledger`)."""
        if self.family == "natural":
            return f"natural-keys={self.natural_keys}-pool={self.natural_pool}-flip_share={self.flip_share}"
        return f"patterns={self.patterns}x{self.per_pattern}-blend={self.blend}-cells={self.cells}"

    @property
    def max_queries(self) -> int:
        """The query budget of one trace: every key, ``repeats`` times."""
        return self.keys * self.repeats



@dataclass(frozen=True)
class TraceConfig:
    epsilon: float = 1e-6          # whole-trace false-accusation probability (all customers)
    scorer: str = "correlation"    # correlation (soft values) | tardos (hard signs)
    decoder: str = "peeling"       # peeling (successive cancellation) | plain
    null_random_keys: int = 10     # per issued copy: examined under this many other keys
    align: bool = True             # re-align suspects to the base model before extracting
    probe_size: int = 512          # aux images run through both models to match channels
    drift_samples: int = 40        # the vendor's simulated updates of its base model the drift-whitened reading is fitted to (0: plain reading only)
    drift_shrink: float = 0.1      # shrinkage of the drift covariances towards a scaled identity
    drift_recipes: tuple = ()      # attack configs (the attacks registry) the simulated updates cycle through
    off_data_limit: float = 1.6    # report a suspect obfuscated above this multiple of the base's off-data weight energy (0: off) ...
    derived_limit: float = 0.75    # ... when its readout moved at most this much from the base's (relative): an update of the base

    def __post_init__(self) -> None:
        object.__setattr__(self, "drift_recipes", tuple(dict(r) for r in self.drift_recipes))
        checks.integer("trace", "drift_samples", self.drift_samples, 0)
        checks.number("trace", "drift_shrink", self.drift_shrink, 0.0, 1.0, low_open=True)
        if self.drift_samples == 1:
            raise ConfigError("trace.drift_samples", "must be 0 (off) or >= 2: a covariance needs at least two updates")
        if self.drift_samples and not self.drift_recipes:
            raise ConfigError("trace.drift_recipes", "must list at least one update (e.g. {attack: fine_tune, epochs: 1}) when drift_samples > 0")
        for recipe in self.drift_recipes:
            if "attack" not in recipe:
                raise ConfigError("trace.drift_recipes", f"every entry needs an 'attack' name, got {recipe}")
            create_attack(recipe["attack"], **recipe_options(recipe))  # a bad option fails here, naming it
        checks.number("trace", "epsilon", self.epsilon, 0.0, 1.0, low_open=True, high_open=True)
        checks.choice("trace", "scorer", self.scorer, available_scorers())
        checks.choice("trace", "decoder", self.decoder, available_decoders())
        checks.integer("trace", "null_random_keys", self.null_random_keys, 0)
        checks.integer("trace", "probe_size", self.probe_size, 1)
        checks.number("trace", "off_data_limit", self.off_data_limit, 0.0)
        checks.number("trace", "derived_limit", self.derived_limit, 0.0, low_open=True)
        if 0 < self.off_data_limit <= 1:
            raise ConfigError("trace.off_data_limit", f"must be 0 (off) or above 1 (the base model itself is at 1), got {self.off_data_limit}")

    def with_overrides(self, epsilon: float | None = None, scorer: str | None = None) -> "TraceConfig":
        """These settings with a caller's epsilon / scorer (the CLI's flags), validated."""
        values = asdict(self)
        if epsilon is not None:
            values["epsilon"] = epsilon
        if scorer is not None:
            values["scorer"] = scorer
        return TraceConfig(**values)



@dataclass(frozen=True)
class VendorFiles:
    """Where the vendor's inputs and private state live (resolved by the entry point).

    ``secret`` and ``state_dir`` are private (never in git, never in a customer's
    artifact); ``aux`` / ``test`` are partition folders, ``bank`` the defended feature
    bank, ``base_model`` the vendor's trained model (safetensors)."""

    secret: Path
    state_dir: Path
    base_model: Path
    aux: Path
    test: Path
    bank: Path
    create_secret: bool = True  # create the secret on first use


@dataclass(frozen=True)
class VendorConfig:
    """Every core config a :class:`~securemark.vendor.Vendor` needs."""

    model: ModelSpec
    code: CodeConfig
    embed: EmbedConfig
    blackbox: BlackboxConfig
    trace: TraceConfig
    drift_subset: int = 2500  # aux images each simulated update of the drift model trains on (the attacker's budget)
    seed: int = 0             # the project's seed (the drift model's updates are drawn from it)

    def digest_fields(self) -> dict[str, Any]:
        """Everything here, as plain values (what a persisted derived object is keyed by)."""
        return asdict(self)
