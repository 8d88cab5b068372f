"""What the params say: one typed, validated settings object per ``params.yaml`` section.

``Settings.load(path)`` (or ``Settings.from_params(dict)``) builds every section once, at
the edge (a DVC stage, the CLI, a deployment), and the flows receive the result. Each
section is a frozen dataclass whose defaults are the only defaults: the core's own
configs where they exist (:class:`~securemark.model.ModelSpec`,
:class:`~securemark.split.protocol.TrainConfig`, ...), small ones here otherwise. A
missing or unknown key, a wrong value or an unknown plug-in name is a
:class:`~securemark.errors.ConfigError` naming the key, raised before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from securemark import checks
from securemark.attacks import create_attack
from securemark.evaluation.grid import expand_grid
from securemark.data import DEBIAN_DATASET_DIR
from securemark.errors import ConfigError, InvalidConfig
from securemark.fingerprint import EmbedConfig
from securemark.model import ModelSpec
from securemark.partition import PartitionSpec
from securemark.privacy import AuditConfig
from securemark.privacy.defence import DefenceConfig
from securemark.split.protocol import TrainConfig
from securemark.split.transport import transport_names
from securemark.vendor.config import BlackboxConfig, CodeConfig, TraceConfig

__all__ = ["Settings", "load_params", "build", "apply_profile", "DEFAULT_PROFILE"]

DEFAULT_PROFILE = "default"  # the sections as written; any other profile overlays ``profiles.<name>``


def load_params(path: Path) -> dict[str, Any]:
    """Read params.yaml; a missing file or a non-mapping is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "file not found")
    params = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}  # libyaml's safe loader: 10x faster
    if not isinstance(params, dict):
        raise ConfigError(str(path), "top level must be a mapping of sections")
    return params


def _overlay(base: Any, over: Any) -> Any:
    """``over`` laid onto ``base``: mappings merge key by key, anything else (lists included) replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _overlay(base.get(k), v) for k, v in over.items()}}
    return over


def apply_profile(params: dict[str, Any], profile: str | None = None) -> dict[str, Any]:
    """The params of one profile (README "Profiles"): the sections as written are the
    ``default`` profile; ``profiles.<name>`` overlays sections onto them (mappings merge,
    lists and values replace). ``profile`` None: the one ``base.profile`` names. The
    result has ``base.profile`` set to the profile applied and no ``profiles`` section."""
    params = dict(params)
    profiles = params.pop("profiles", None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise ConfigError("profiles", "must map each profile name to a mapping of sections to overlay")
    if DEFAULT_PROFILE in profiles:
        raise ConfigError(f"profiles.{DEFAULT_PROFILE}", "the default profile is the sections as written; it takes no overlay")
    name = (params.get("base") or {}).get("profile", DEFAULT_PROFILE) if profile is None else profile
    if name != DEFAULT_PROFILE and name not in profiles:
        raise ConfigError("base.profile", f"unknown profile {name!r}; valid profiles: {[DEFAULT_PROFILE, *sorted(profiles)]}")
    overlay = profiles.get(name, {})
    unknown = sorted(set(overlay) - set(params))
    if unknown:
        raise ConfigError(f"profiles.{name}.{unknown[0]}", f"overlays a section params.yaml does not have; sections: {sorted(params)}")
    params = {section: _overlay(params[section], overlay[section]) if section in overlay else params[section] for section in params}
    params["base"] = {**(params.get("base") or {}), "profile": name}
    return params


def _section(params: dict[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name)
    if not isinstance(value, dict):
        raise ConfigError(name, "section missing or not a mapping")
    return value


def build(cls, values: dict[str, Any], name: str, **extra):
    """A frozen dataclass from one params mapping; unknown keys and bad values name the key.

    ``extra``: values from elsewhere (e.g. the shared seed)."""
    accepted = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}", f"unknown key; valid keys: {sorted(set(accepted) - set(extra))}")
    try:
        return cls(**{**values, **extra})
    except ConfigError:
        raise
    except (InvalidConfig, TypeError) as exc:
        raise ConfigError(name, str(exc)) from None


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class BaseSettings:
    seed: int = 0
    profile: str = "default"

    def __post_init__(self) -> None:
        checks.integer("base", "seed", self.seed, 0)


@dataclass(frozen=True)
class DataSettings:
    source_dir: str = str(DEBIAN_DATASET_DIR)  # Debian's dataset-fashion-mnist
    allow_download: bool = False                # let torchvision download when source_dir is absent


@dataclass(frozen=True)
class ValidateSettings:
    class_share_tolerance: float = 0.25  # IID: each class share within 10% +- 25% (relative)

    def __post_init__(self) -> None:
        checks.number("validate", "class_share_tolerance", self.class_share_tolerance, 0.0)


@dataclass(frozen=True)
class TrainSettings:
    """The split-training recipe (``config``) and how messages travel (``transport``)."""

    config: TrainConfig
    transport: str = "inprocess"

    def __post_init__(self) -> None:
        checks.choice("train", "transport", self.transport, transport_names())


@dataclass(frozen=True)
class VendorSettings:
    secret_file: str = "~/.securemark/vendor.key"  # or SECUREMARK_SECRET_FILE; never in git
    state_dir: str = "vendor"                      # ledger + codebook cache (git-ignored), or SECUREMARK_VENDOR_DIR
    create_secret: bool = True                     # create the secret on first use


@dataclass(frozen=True)
class FingerprintSettings:
    code: CodeConfig
    embed: EmbedConfig


@dataclass(frozen=True)
class IssueSettings:
    customers: int = 20  # the pipeline issues customer-0001..customer-NNNN
    batch: int = 20      # customers training together (a rolling batch: the next joins when one is done)
    task: int = 100      # customers per task (one rolling batch; the unit a worker runs and a retry repeats)

    def __post_init__(self) -> None:
        checks.integer("issue", "customers", self.customers, 1)
        checks.integer("issue", "batch", self.batch, 1)
        checks.integer("issue", "task", self.task, 1)

    def customer_ids(self) -> list[str]:
        return [f"customer-{i:04d}" for i in range(1, self.customers + 1)]


GRID_KEYS = ("attack", "targets", "coalition_sizes", "budget")  # keys of a grid entry that are not the attack's own options


def attack_options(config: dict[str, Any]) -> dict[str, Any]:
    """The attack's own options in a grid entry (without ``attack``, ``targets``, ``coalition_sizes``
    and ``budget``: the attacker's images for this entry, one of ``attacker.budgets``)."""
    return {k: v for k, v in config.items() if k not in GRID_KEYS}


@dataclass(frozen=True)
class AttackerSettings:
    """What the attacker owns and builds alone."""

    budget: int = 2500                                  # images of the attacker partition an attack uses (class-balanced subset)
    budgets: tuple[int, ...] = (1000, 2500, 5000, 10000)  # the attacker-alone sweep (must include budget)
    min_steps: int = 600                                # the vendor's recipe, trained for at least this many steps

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets", tuple(self.budgets))
        checks.integer("attacker", "budget", self.budget, 1)
        for b in self.budgets:
            checks.integer("attacker", "budgets[]", b, 1)
        checks.integer("attacker", "min_steps", self.min_steps, 1)
        if self.budget not in self.budgets:
            raise ConfigError("attacker.budgets", f"must include attacker.budget ({self.budget}), so that every attack has its baseline")


@dataclass(frozen=True)
class AttackSettings:
    targets: int = 2                          # copies attacked by each single-copy attack
    trials: int = 3                           # random coalitions per size
    coalition_sizes: tuple[int, ...] = (2, 4, 8)
    grid: tuple[dict[str, Any], ...] = ()     # list values expand into one attack per value

    def __post_init__(self) -> None:
        object.__setattr__(self, "coalition_sizes", tuple(self.coalition_sizes))
        object.__setattr__(self, "grid", tuple(dict(g) for g in self.grid))
        checks.integer("attack", "targets", self.targets, 1)
        checks.integer("attack", "trials", self.trials, 1)
        for c in self.coalition_sizes:
            checks.integer("attack", "coalition_sizes[]", c, 2)
        for i, entry in enumerate(self.grid):
            if "attack" not in entry:
                raise ConfigError(f"attack.grid[{i}]", f"need a mapping with an 'attack' key, got {entry!r}")
        try:
            configs = self.configs()
        except InvalidConfig as exc:
            raise ConfigError("attack.grid", str(exc)) from None
        for i, config in enumerate(configs):  # every entry must build: fail before any work
            if not isinstance(config, dict) or "attack" not in config:
                raise ConfigError(f"attack.grid[{i}]", f"need a mapping with an 'attack' key, got {config!r}")
            try:
                create_attack(config["attack"], **attack_options(config))
                checks.integer(f"attack {config['attack']!r}", "targets", config.get("targets", self.targets), 1)
                if "budget" in config:
                    checks.integer(f"attack {config['attack']!r}", "budget", config["budget"], 1)
                for c in self.sizes_for(config):
                    checks.integer(f"attack {config['attack']!r}", "coalition_sizes[]", c, 2)
            except InvalidConfig as exc:
                raise ConfigError(f"attack.grid ({config['attack']})", str(exc)) from None

    def configs(self) -> list[dict[str, Any]]:
        """The grid with list values expanded: one config per attacked model family."""
        return expand_grid([dict(g) for g in self.grid])

    def sizes_for(self, config: dict[str, Any]) -> tuple[int, ...]:
        """The coalition sizes a coalition attack runs at: the entry's own
        ``coalition_sizes`` (a list expands into one family per size), else the section's."""
        sizes = config.get("coalition_sizes", self.coalition_sizes)
        return (sizes,) if isinstance(sizes, int) else tuple(sizes)


@dataclass(frozen=True)
class OpsSettings:
    audit_cron: str | None = "0 2 * * *"  # robustness-audit deployment: nightly at 02:00 UTC
    max_workers: int = 2                  # threads for the per-customer / per-attack fan-out
    dask_address: str | None = None       # run the fan-out on this Dask cluster (or SECUREMARK_DASK_ADDRESS)

    def __post_init__(self) -> None:
        checks.integer("ops", "max_workers", self.max_workers, 1)


# ----------------------------------------------------------------------------- all of it
@dataclass(frozen=True)
class Settings:
    """Every section of ``params.yaml``, typed and validated."""

    base: BaseSettings
    data: DataSettings
    prepare: PartitionSpec
    validate: ValidateSettings
    model: ModelSpec
    train: TrainSettings
    defence: DefenceConfig
    privacy_audit: AuditConfig
    vendor: VendorSettings
    fingerprint: FingerprintSettings
    blackbox: BlackboxConfig
    issue: IssueSettings
    trace: TraceConfig
    attacker: AttackerSettings
    attack: AttackSettings
    ops: OpsSettings

    @classmethod
    def load(cls, path: Path, profile: str | None = None) -> "Settings":
        """The settings of ``path`` under ``profile`` (None: the one ``base.profile`` names)."""
        return cls.from_params(load_params(path), profile)

    @classmethod
    def from_params(cls, params: dict[str, Any], profile: str | None = None) -> "Settings":
        params = apply_profile(params, profile)
        unknown = sorted(set(params) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(unknown[0], f"unknown section; valid sections: {[f.name for f in fields(cls)]}")
        base = build(BaseSettings, _section(params, "base"), "base")
        train = dict(_section(params, "train"))
        transport = train.pop("transport", "inprocess")
        fingerprint = dict(_section(params, "fingerprint"))
        code = dict(fingerprint.pop("code", None) or {})
        code_settings = build(CodeConfig, {"family": code.pop("family", "random"), "capacity": code.pop("capacity", 1000), "options": code},
                              "fingerprint.code")
        settings = cls(
            base=base,
            data=build(DataSettings, params.get("data") or {}, "data"),
            prepare=build(PartitionSpec, _section(params, "prepare"), "prepare"),
            validate=build(ValidateSettings, params.get("validate") or {}, "validate"),
            model=build(ModelSpec, _section(params, "model"), "model"),
            train=build(TrainSettings, {"config": build(TrainConfig, train, "train", seed=base.seed), "transport": transport}, "train"),
            defence=build(DefenceConfig, _section(params, "defence"), "defence"),
            privacy_audit=build(AuditConfig, _section(params, "privacy_audit"), "privacy_audit", seed=base.seed),
            vendor=build(VendorSettings, params.get("vendor") or {}, "vendor"),
            fingerprint=build(FingerprintSettings, {"code": code_settings, "embed": build(EmbedConfig, fingerprint, "fingerprint")}, "fingerprint"),
            blackbox=build(BlackboxConfig, params.get("blackbox") or {}, "blackbox"),
            issue=build(IssueSettings, _section(params, "issue"), "issue"),
            trace=build(TraceConfig, _section(params, "trace"), "trace"),
            attacker=build(AttackerSettings, params.get("attacker") or {}, "attacker"),
            attack=build(AttackSettings, _aim_at_fingerprint(params.get("attack") or {}, fingerprint.get("layer", EmbedConfig.layer)), "attack"),
            ops=build(OpsSettings, params.get("ops") or {}, "ops"),
        )
        if settings.blackbox.keys > settings.prepare.aux_size:
            bb = settings.blackbox
            key, what = (("blackbox.natural_keys", f"{bb.keys} natural keys") if bb.family == "natural" else
                         ("blackbox.per_pattern", f"{bb.patterns} patterns x {bb.per_pattern} images = {bb.keys} keys"))
            raise ConfigError(key, f"{what} need as many aux images (prepare.aux_size = {settings.prepare.aux_size})")
        largest = max(settings.attacker.budgets)
        if largest > settings.prepare.attacker_size:
            raise ConfigError("attacker.budgets", f"{largest} images exceed the attacker partition (prepare.attacker_size = {settings.prepare.attacker_size})")
        return settings

    def flat(self, section: str) -> dict[str, Any]:
        """One section as flat ``section.key: value`` pairs (for MLflow params)."""
        return {f"{section}.{k}": v for k, v in _flatten(getattr(self, section)).items()}


FINGERPRINTED = "fingerprinted"  # in an attack's `layers`: the block whose weight carries the code word


def _aim_at_fingerprint(value: Any, layer: str) -> Any:
    """``value`` (an attack section, or part of it) with every ``fingerprinted`` entry of
    a ``layers`` list replaced by the block that ``fingerprint.layer`` names
    (``server.dense2.linear.weight`` -> ``server.dense2``): the grid's attacks aimed at
    the fingerprint follow it when the architecture or the layer changes."""
    if isinstance(value, list):
        return [_aim_at_fingerprint(v, layer) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _aim_at_fingerprint(v, layer) for k, v in value.items()}
    if isinstance(out.get("layers"), list):
        block = str(layer).rsplit(".", 2)[0]
        out["layers"] = [block if x == FINGERPRINTED else x for x in out["layers"]]
    return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    values = asdict(obj) if is_dataclass(obj) else obj
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
