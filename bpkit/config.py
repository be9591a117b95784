"""Typed run configuration: YAML into dataclasses, with dotted overrides.

A config file has the sections ``run``, ``data``, ``model``, ``optimizer``, ``mesh``,
``distributed`` and ``diagnostics``; every field has a default, so a file only names what it
changes (``bpkit config show CONFIG`` prints them all, each with its comment from this file).
Overrides on the command line are ``section.key=value`` with the value parsed as YAML
(``run.steps=200``, ``model.args.hidden=[64,64]``, ``run.check_parity=false``).

The file must be UTF-8; YAML syntax errors and keys given twice in one mapping (which PyYAML
would silently resolve to the last) are errors naming ``file:line:column``. Every other
mistake -- unknown keys, wrong types, values outside their domain (``bpkit.validate``),
model arguments the factory does not take -- is collected, and all of them are raised in one
``ConfigError`` (one sentence each, naming the key and what to change); the CLI prints it and
exits with status 2:

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

from bpkit import validate as _validate


class ConfigError(ValueError):
    """A mistake in a config file or an override: the message says what to change.

    ``problems`` lists every mistake found (the message names them all)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


@dataclass
class RunConfig:
    name: str = "run"                     # run directory: runs/<name> unless out_dir is set
    out_dir: str | None = None            # where the run directory goes (null: runs/<name>)
    seed: int = 0                         # data order, initialisation and dropout follow from it
    steps: int = 1000                     # optimizer steps (micro-steps with accumulation)
    log_every: int = 50                   # steps between metrics.jsonl lines / log lines
    eval_every: int = 500                 # steps between evaluations (0: at the end only)
    checkpoint_every: int = 500           # steps between checkpoints (0: at the end only)
    keep_checkpoints: int = 3             # newest checkpoints kept (0: keep all)
    engine: Literal["bpkit", "jax"] = "bpkit"  # bpkit (hand-written backward) or jax (jax.grad)
    check_parity: bool = True             # compare bpkit with jax.grad on the first batch
    on_nonfinite: Literal["stop", "skip"] = "stop"  # NaN/Inf loss or gradient norm: stop, or skip
    max_skipped: int = 10                 # skip: stop (exit 1) after this many skips in a row
    resume: Literal["auto", "never", "must"] = "auto"  # existing run dir (docs/training.md)
    progress: Literal["auto", "bar", "log"] = "auto"  # auto: a bar on a terminal, else log lines
    sample_length: int = 200              # characters printed at the end of a language-model run
    eval_batches: int = 0                 # evaluation batches per evaluation (0: the whole split)
    peak_flops: float | None = None       # the devices' peak FLOP/s, for MFU (null: FLOP/s only)
    # which forward values the backward keeps: none (all it reads), auto (the fewest bytes; see
    # bpkit.grad's remat=) or one of jax.checkpoint_policies (the whole loss under jax.checkpoint)
    remat: Literal["none", "auto", "nothing_saveable", "dots_saveable",
                   "dots_with_no_batch_dims_saveable", "everything_saveable"] = "none"
    remat_budget_bytes: int | None = None  # remat=auto: most bytes saved for the backward
    # reuse: keep freed host memory for the next step (no page faults on XLA's CPU temporaries;
    # bpkit/host_memory.py); system: leave the C library's allocator settings alone
    host_memory: Literal["reuse", "system"] = "reuse"
    # auto: compile the steps with the XLA options measured faster on this JAX and backend
    # (bpkit.engine.compat.step_compiler_options); default: XLA's own defaults
    xla_options: Literal["auto", "default"] = "auto"

    def step_compiler_options(self) -> str | None:
        """``xla_options`` as the steps' ``compiler_options`` keyword."""
        return "auto" if self.xla_options == "auto" else None

    def grad_options(self) -> dict:
        """``remat``/``remat_budget_bytes`` as ``bpkit.grad`` keywords (those that are set)."""
        options = {"remat": None if self.remat == "none" else self.remat,
                   "remat_budget_bytes": self.remat_budget_bytes}
        return {k: v for k, v in options.items() if v is not None}


@dataclass
class DataConfig:
    # the data set: generated offline (mnist1d, toy2d, regression1d, reverse), shipped by an
    # installed package (digits: scikit-learn's), simulated (cartpole) or read from data.path
    name: Literal["mnist1d", "text", "toy2d", "regression1d", "npz", "idx", "digits",
                  "reverse", "cartpole"] = "mnist1d"
    batch_size: int = 128                 # examples (sequences, episodes) per step
    eval_batch_size: int = 500            # examples per evaluation batch
    path: str | None = None               # text file, .npz file, or IDX images file (train)
    test_path: str | None = None          # .npz / IDX images file for evaluation
    labels_path: str | None = None        # IDX labels file (train)
    test_labels_path: str | None = None   # IDX labels file (test)
    num_train: int = 4000                 # mnist1d/regression1d/reverse: training examples
    num_test: int = 1000                  # mnist1d/regression1d/reverse: test examples
    context: int = 64                     # text: characters per sequence; reverse: per string
    max_chars: int = 2_000_000            # text: cap on the corpus size
    encoding: str | None = None           # text: the file's encoding (null: UTF-8, strictly)
    # text without data.path: the standard library's source, or its docstrings (English prose
    # in the source's vocabulary: the corpus B of the fine-tuning study, docs/training.md)
    corpus: Literal["python_source", "python_docs"] = "python_source"
    distribution: Literal["ring", "grid", "moons", "spiral"] = "ring"  # toy2d: the 2-D shape
    noise: float = 0.1                    # toy2d/regression1d: noise scale
    cache_dir: str | None = None          # default: $BPKIT_CACHE or ~/.cache/bpkit


@dataclass
class ModelConfig:
    name: str = "mlp"                     # a factory in bpkit.models
    args: dict = field(default_factory=dict)  # keyword arguments of bpkit.models.<name>
    # the training loss (reinforce: the policy gradient of bpkit/envs/policy_gradient.py)
    loss: Literal["cross_entropy", "mse", "huber", "gan", "reinforce"] = "cross_entropy"
    label_smoothing: float = 0.0          # cross-entropy: weight of the uniform target, [0, 1)
    # float32, or bfloat16 compute on float32 master parameters
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    init_from: str | None = None          # run directory whose latest checkpoint gives params


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad",
                  "lion", "lamb"] = "adam"  # the optax optimizer
    learning_rate: float = 1e-3           # peak learning rate
    # the learning rate over the run (after warmup_steps)
    schedule: Literal["constant", "linear", "cosine", "exponential", "piecewise"] = "constant"
    warmup_steps: int = 0                 # linear warmup from 0 before the schedule
    decay_steps: int | None = None        # default: run.steps
    final_lr_fraction: float = 0.0        # linear/cosine: end learning rate / peak
    decay_rate: float = 0.5               # exponential: factor per transition_steps
    transition_steps: int = 1000          # exponential: steps per decay_rate factor
    boundaries: list = field(default_factory=list)  # piecewise: steps where lr changes
    scales: list = field(default_factory=list)      # piecewise: factor applied at each boundary
    momentum: float = 0.9                 # momentum/nesterov/rmsprop: momentum, [0, 1)
    b1: float = 0.9                       # adam-family: first-moment decay, [0, 1)
    b2: float = 0.999                     # adam-family: second-moment decay, [0, 1)
    eps: float = 1e-8                     # added to the denominator, > 0
    weight_decay: float = 0.0             # decoupled (adamw/lion/lamb) or L2 weight decay
    # pull toward the starting (with init_from: pre-trained) weights: the gradient of
    # (l2_pull/2)||params - params_0||^2 is added to the loss's (L2-SP; 0: off)
    l2_pull: float = 0.0
    decay_mask: Literal["default", "all", "none"] = "default"  # default: no biases/norm scales
    clip_norm: float | None = None        # clip gradients by global norm
    accumulate_steps: int = 1             # gradient accumulation (optax.MultiSteps)
    freeze: list = field(default_factory=list)      # path patterns kept fixed (fnmatch)
    trainable: list = field(default_factory=list)   # if given: all other params are frozen
    # DP-SGD: {l2_clip: C, noise_multiplier: sigma[, delta: 1e-5]} clips every example's
    # gradient to norm C and adds N(0, (sigma C)^2) noise to their sum ({}: off)
    dp: dict = field(default_factory=dict)
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
    num_processes: int | None = None      # processes in the job
    process_id: int | None = None         # this process: 0 .. num_processes-1
    auto: bool = False                    # jax.distributed.initialize() with no arguments


@dataclass
class DiagnosticsConfig:
    every: int = 0                        # steps between backward-signal logs (0: off)
    vanish_ratio: float = 1e-3            # warn below this x the top layer's signal
    explode_ratio: float = 1e3            # warn above this x the top layer's signal
    health: bool = True                   # per-layer health with the signals (every > 0)
    dead_fraction: float = 0.25           # warn when a larger fraction of a layer's units is dead
    update_ratio_min: float = 1e-4        # warn when a layer's ||update|| / ||params|| is below
    update_ratio_max: float = 1e-1        # ... or above this (Karpathy's rule of thumb: ~1e-3)
    explain_nonfinite: bool = True        # on a non-finite update: trace where it came from


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


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (mappings all the way down; lists are values)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


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
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: got {value!r}, expected {_describe(tp)}{hint}")
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
            try:
                return float(value)
            except OverflowError:  # an integer with hundreds of digits
                raise ConfigError(f"{key}: got an integer with {len(str(value))} digits, "
                                  f"expected {_describe(tp)} within the float range") from None
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
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected a list "
                              f"(write [{value}] for a list of one)")
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected {_describe(tp)}")


def _section_from(name: str, raw: Any, problems: list[str]):
    """The section dataclass from its raw mapping; every unknown key and wrongly typed value is
    added to ``problems`` (that field keeps its default)."""
    cls = _SECTION_CLASSES[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"section '{name}' must be a mapping of keys to values, got {raw!r}; "
                        f"write it as '{name}:' followed by indented 'key: value' lines")
        return cls()
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            problems.append(f"unknown key '{name}.{key}'"
                            + _suggest(str(key), hints, name + "."))
            continue
        try:
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        except ConfigError as e:
            problems.append(str(e))
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value "
                          "(for example run.steps=100)")
    key, _, raw = text.partition("=")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else None
    except DuplicateKeyError as e:
        raise ConfigError(f"override '{text}': {e.problem}; keep one of the two") from None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(raw: dict, text: str) -> None:
    """Set one ``section.key[.key...]=value`` override in ``raw`` (nested dicts copied)."""
    parts, value = _parse_override(text)
    section = parts[0]
    if section not in _SECTION_CLASSES:
        raise ConfigError(f"unknown section '{section}' in override '{text}'"
                          + _suggest(section, _SECTION_CLASSES))
    if len(parts) < 2 or not all(parts):
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


def config_from_dict(raw: Any, overrides: list[str] = ()) -> Config:
    """A ``Config`` from a parsed YAML mapping plus ``section.key=value`` overrides.

    Every problem found (unknown keys, wrong types, values out of their domain, model
    arguments the factory does not take, ...) is reported in one ``ConfigError``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("a config file must be a mapping with sections "
                          + ", ".join(_SECTION_CLASSES))
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    problems: list[str] = []
    for text in overrides:
        try:
            _apply_override(raw, text)
        except ConfigError as e:
            problems.append(str(e))
    for section in raw:
        if section not in _SECTION_CLASSES:
            problems.append(f"unknown section '{section}'" + _suggest(str(section),
                                                                      _SECTION_CLASSES))
    cfg = Config(**{name: _section_from(name, raw.get(name), problems)
                    for name in _SECTION_CLASSES})
    problems += validate_problems(cfg)
    if problems:
        raise ConfigError(_validate.report(problems), problems)
    return cfg


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping names the same key twice (PyYAML would silently keep the last)."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if first is not None:
                raise DuplicateKeyError(
                    None, None, f"duplicate key {key!r} (first given at line "
                    f"{first.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _read_text(path: str) -> str:
    """The config file's text; ``ConfigError`` naming the path if it cannot be read as UTF-8."""
    if os.path.isdir(path):
        hint = (f"; to train or inspect that run use {os.path.join(path, 'config.yaml')}"
                if os.path.isfile(os.path.join(path, "config.yaml")) else
                "; give a YAML file such as configs/mnist1d_mlp.yaml")
        raise ConfigError(f"{path} is a directory, not a config file{hint}")
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path} (the shipped configs are in "
                          "configs/, e.g. configs/mnist1d_mlp.yaml)")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path} ({e.strerror or e}); check "
                          "its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}:{line}:{column}: the config file is not UTF-8 text (byte "
                          f"0x{data[e.start]:02x} cannot be decoded); save it as UTF-8") from None


def _yaml_error(path: str, e: yaml.YAMLError) -> ConfigError:
    """``path:line:column: what is wrong; what to do`` for a PyYAML error."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    if isinstance(e, DuplicateKeyError):
        return ConfigError(f"{where}: {e.problem}; keep one of the two")
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    what = f"{problem} ({context})" if context else problem
    return ConfigError(f"{where}: invalid YAML: {what}; fix the syntax there (indent with "
                       "spaces, and quote values that contain ': ' or ' #')")


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML) and apply ``overrides``; raises ``ConfigError`` on any mistake.
    Every path in it is made absolute against the current directory (``bpkit.paths``)."""
    text = _read_text(path)
    try:
        raw = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    if raw is None:
        raise ConfigError(f"{path} is empty; a config needs at least a 'run' section (start "
                          "from a shipped one, e.g. configs/mnist1d_mlp.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping with sections "
                          + ", ".join(_SECTION_CLASSES) + f", not a {type(raw).__name__}")
    from bpkit.paths import resolve_paths
    return resolve_paths(config_from_dict(raw, list(overrides)))


def validate_problems(cfg: Config) -> list[str]:
    """Every problem the config alone shows (``bpkit.validate.config_problems``) plus the
    ``distributed`` section's consistency."""
    problems = _validate.config_problems(cfg)
    problems += _remat_problems(cfg)
    d = cfg.distributed
    explicit = {"coordinator_address": d.coordinator_address,
                "num_processes": d.num_processes, "process_id": d.process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if d.auto and given:
        problems.append("distributed.auto: true detects the cluster by itself; leave "
                        + ", ".join(f"distributed.{k}" for k in given) + " null")
    elif given and len(given) != 3:
        missing = [k for k in explicit if k not in given]
        problems.append("distributed: set coordinator_address, num_processes and process_id "
                        "together (missing " + ", ".join(f"distributed.{k}" for k in missing)
                        + "), or distributed.auto=true under a cluster launcher")
    elif len(given) == 3 and not any(p.startswith("distributed.") for p in problems):
        if not 0 <= d.process_id < d.num_processes:
            problems.append(f"distributed.process_id: got {d.process_id}, expected 0 .. "
                            f"{d.num_processes - 1} (num_processes={d.num_processes})")
        if cfg.data.batch_size % d.num_processes:
            problems.append(f"data.batch_size: {cfg.data.batch_size} is not divisible by "
                            f"distributed.num_processes={d.num_processes}")
    return problems


def _remat_problems(cfg: Config) -> list[str]:
    run = cfg.run
    if run.remat_budget_bytes is not None and run.remat != "auto":
        return [f"run.remat_budget_bytes: {run.remat_budget_bytes} bounds run.remat=auto's plan; "
                f"set run.remat=auto (it is {run.remat}) or run.remat_budget_bytes=null"]
    if run.remat == "auto" and run.engine == "jax":
        return ["run.remat: auto is bpkit's own plan; with run.engine=jax use none or a "
                "jax.checkpoint_policies name"]
    if run.remat != "none" and cfg.optimizer.dp:
        return ["run.remat: DP-SGD (optimizer.dp) runs its own per-example backward; set "
                "run.remat=none"]
    return []


def validate(cfg: Config) -> None:
    """Raise one ``ConfigError`` listing every problem of ``cfg`` (see ``validate_problems``)."""
    problems = validate_problems(cfg)
    if problems:
        raise ConfigError(_validate.report(problems), problems)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written to ``<run dir>/config.yaml``)."""
    d = cfg.to_dict()
    d["run"]["out_dir"] = cfg.out_dir
    return yaml.safe_dump(d, sort_keys=False)


__all__ = ["Config", "RunConfig", "DataConfig", "ModelConfig", "OptimizerConfig", "MeshConfig",
           "DistributedConfig", "DiagnosticsConfig", "ConfigError", "load_config",
           "config_from_dict", "dump_config"]
