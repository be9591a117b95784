"""Typed run configuration: YAML (``yaml.safe_load``) into dataclasses, with dotted overrides.

A config file has the sections ``run``, ``data``, ``model``, ``optimizer``, ``mesh``,
``distributed`` and ``diagnostics``; every field has a default, so a file only names what it changes. Overrides on
the command line are ``section.key=value`` with the value parsed as YAML (``run.steps=200``,
``model.args.hidden=[64,64]``, ``run.check_parity=false``).

Every user mistake raises ``ConfigError`` with a one-line message that names the key and what is
allowed (as optax's errors list the valid options); the CLI turns it into exit status 2:

    >>> load_config("configs/mnist1d_mlp.yaml", ["run.stpes=10"])
    ConfigError: unknown key 'run.stpes' (did you mean 'run.steps'?)
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A mistake in a config file or an override: the message says what to change."""


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str | None = None            # default: runs/<name>
    seed: int = 0
    steps: int = 1000
    log_every: int = 50
    eval_every: int = 500                 # 0: evaluate only at the end
    checkpoint_every: int = 500           # 0: checkpoint only at the end
    keep_checkpoints: int = 3
    engine: Literal["bpkit", "jax"] = "bpkit"
    check_parity: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"
    progress: Literal["auto", "bar", "log"] = "auto"
    sample_length: int = 200              # characters printed at the end of a language-model run
    eval_batches: int = 0                 # evaluation batches per evaluation (0: the whole split)


@dataclass
class DataConfig:
    name: Literal["mnist1d", "text", "toy2d", "regression1d", "npz", "idx", "digits",
                  "reverse", "cartpole"] = "mnist1d"
    batch_size: int = 128
    eval_batch_size: int = 500
    path: str | None = None               # text file, .npz file, or IDX images file (train)
    test_path: str | None = None          # .npz / IDX images file for evaluation
    labels_path: str | None = None        # IDX labels file (train)
    test_labels_path: str | None = None   # IDX labels file (test)
    num_train: int = 4000
    num_test: int = 1000
    context: int = 64                     # text: characters per training sequence
    max_chars: int = 2_000_000            # text: cap on the corpus size
    distribution: Literal["ring", "grid", "moons", "spiral"] = "ring"
    noise: float = 0.1
    cache_dir: str | None = None          # default: $BPKIT_CACHE or ~/.cache/bpkit


@dataclass
class ModelConfig:
    name: str = "mlp"
    args: dict = field(default_factory=dict)  # keyword arguments of bpkit.models.<name>
    loss: Literal["cross_entropy", "mse", "huber", "gan", "reinforce"] = "cross_entropy"
    label_smoothing: float = 0.0
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    init_from: str | None = None          # run directory whose latest checkpoint gives params


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad",
                  "lion", "lamb"] = "adam"
    learning_rate: float = 1e-3
    schedule: Literal["constant", "linear", "cosine", "exponential", "piecewise"] = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None        # default: run.steps
    final_lr_fraction: float = 0.0        # linear/cosine: end learning rate / peak
    decay_rate: float = 0.5               # exponential: factor per transition_steps
    transition_steps: int = 1000
    boundaries: list = field(default_factory=list)  # piecewise: steps where lr changes
    scales: list = field(default_factory=list)      # piecewise: factor applied at each boundary
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_mask: Literal["default", "all", "none"] = "default"  # default: no biases/norm scales
    clip_norm: float | None = None        # clip gradients by global norm
    accumulate_steps: int = 1             # gradient accumulation (optax.MultiSteps)
    freeze: list = field(default_factory=list)      # path patterns kept fixed (fnmatch)
    trainable: list = field(default_factory=list)   # if given: all other params are frozen
    # GAN only: the discriminator's optimizer learning rate (same name and other settings).
    d_learning_rate: float | None = None


@dataclass
class MeshConfig:
    data: int = 1                         # devices the batch is split over (data parallelism)
    fsdp: int = 1                         # devices parameters/optimizer state are split over


@dataclass
class DistributedConfig:
    """Multi-host: all null (and auto false) is a single process."""
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False                    # jax.distributed.initialize() with no arguments


@dataclass
class DiagnosticsConfig:
    every: int = 0                        # steps between backward-signal logs (0: off)
    vanish_ratio: float = 1e-3            # warn below this x the top layer's signal
    explode_ratio: float = 1e3            # warn above this x the top layer's signal


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    @property
    def out_dir(self) -> str:
        return self.run.out_dir or os.path.join("runs", self.run.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {"run": RunConfig, "data": DataConfig, "model": ModelConfig,
                    "optimizer": OptimizerConfig, "mesh": MeshConfig,
                    "distributed": DistributedConfig, "diagnostics": DiagnosticsConfig}


def _suggest(name: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f"; valid keys: {', '.join(prefix + v for v in valid)}"


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", dict: "a mapping"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """``value`` checked against the annotation ``tp``; raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected {_describe(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: got {value!r}, expected {_describe(tp)}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected {_describe(tp)}")


def _section_from(name: str, raw: Any):
    cls = _SECTION_CLASSES[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section '{name}' must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"unknown key '{name}.{key}'" + _suggest(str(key), hints, name + "."))
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value "
                          "(for example run.steps=100)")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def config_from_dict(raw: Any, overrides: list[str] = ()) -> Config:
    """A ``Config`` from a parsed YAML mapping plus ``section.key=value`` overrides."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("a config file must be a mapping with sections "
                          + ", ".join(_SECTION_CLASSES))
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        parts, value = _parse_override(text)
        section = parts[0]
        if section not in _SECTION_CLASSES:
            raise ConfigError(f"unknown section '{section}' in override '{text}'"
                              + _suggest(section, _SECTION_CLASSES))
        if len(parts) < 2:
            raise ConfigError(f"override '{text}' must name a key inside '{section}' "
                              f"(for example {section}.<key>=value)")
        target = raw.setdefault(section, {}) or {}
        raw[section] = target
        if not isinstance(target, dict):
            raise ConfigError(f"section '{section}' must be a mapping")
        for p in parts[1:-1]:
            nested = target.get(p)
            if nested is None:
                nested = target[p] = {}
            elif not isinstance(nested, dict):
                raise ConfigError(f"'{'.'.join(parts[:-1])}' is not a mapping; cannot set "
                                  f"'{'.'.join(parts)}'")
            else:
                nested = target[p] = dict(nested)
            target = nested
        target[parts[-1]] = value
    for section in raw:
        if section not in _SECTION_CLASSES:
            raise ConfigError(f"unknown section '{section}'" + _suggest(str(section),
                                                                          _SECTION_CLASSES))
    cfg = Config(**{name: _section_from(name, raw.get(name)) for name in _SECTION_CLASSES})
    validate(cfg)
    return cfg


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML) and apply ``overrides``; raises ``ConfigError`` on any mistake."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return config_from_dict(raw, list(overrides))


def validate(cfg: Config) -> None:
    """Cross-field checks: positive sizes, piecewise schedules that line up, a complete ``distributed`` section, sensible diagnostics ratios."""
    positive = {"run.steps": cfg.run.steps, "run.log_every": cfg.run.log_every,
                "data.batch_size": cfg.data.batch_size,
                "data.eval_batch_size": cfg.data.eval_batch_size,
                "optimizer.accumulate_steps": cfg.optimizer.accumulate_steps,
                "mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp, "data.context": cfg.data.context}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: got {value}, expected a positive integer")
    for key in ("eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
        if getattr(cfg.run, key) < 0:
            raise ConfigError(f"run.{key}: got {getattr(cfg.run, key)}, expected >= 0")
    if cfg.optimizer.learning_rate <= 0:
        raise ConfigError(f"optimizer.learning_rate: got {cfg.optimizer.learning_rate}, "
                          "expected a positive number")
    if cfg.optimizer.schedule == "piecewise" and (
            len(cfg.optimizer.boundaries) != len(cfg.optimizer.scales)):
        raise ConfigError("optimizer.boundaries and optimizer.scales must have the same length "
                          f"(got {len(cfg.optimizer.boundaries)} and "
                          f"{len(cfg.optimizer.scales)})")
    d = cfg.distributed
    explicit = {"coordinator_address": d.coordinator_address,
                "num_processes": d.num_processes, "process_id": d.process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if d.auto and given:
        raise ConfigError("distributed.auto: true detects the cluster by itself; leave "
                          + ", ".join(f"distributed.{k}" for k in given) + " null")
    if given and len(given) != 3:
        missing = [k for k in explicit if k not in given]
        raise ConfigError("distributed: set coordinator_address, num_processes and process_id "
                          "together (missing " + ", ".join(f"distributed.{k}" for k in missing)
                          + "), or distributed.auto=true under a cluster launcher")
    if len(given) == 3:
        if d.num_processes < 1:
            raise ConfigError(f"distributed.num_processes: got {d.num_processes}, expected a "
                              "positive integer")
        if not 0 <= d.process_id < d.num_processes:
            raise ConfigError(f"distributed.process_id: got {d.process_id}, expected 0 .. "
                              f"{d.num_processes - 1} (num_processes={d.num_processes})")
        if cfg.data.batch_size % d.num_processes:
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is not divisible by "
                              f"distributed.num_processes={d.num_processes}")
    g = cfg.diagnostics
    if g.every < 0:
        raise ConfigError(f"diagnostics.every: got {g.every}, expected >= 0 (0: off)")
    if not 0 < g.vanish_ratio < g.explode_ratio:
        raise ConfigError(f"diagnostics.vanish_ratio ({g.vanish_ratio}) and "
                          f"diagnostics.explode_ratio ({g.explode_ratio}) must satisfy "
                          "0 < vanish_ratio < explode_ratio")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written to ``<run dir>/config.yaml``)."""
    d = cfg.to_dict()
    d["run"]["out_dir"] = cfg.out_dir
    return yaml.safe_dump(d, sort_keys=False)


__all__ = ["Config", "RunConfig", "DataConfig", "ModelConfig", "OptimizerConfig", "MeshConfig",
           "DistributedConfig", "DiagnosticsConfig", "ConfigError", "load_config",
           "config_from_dict", "dump_config"]
