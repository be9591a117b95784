"""Checks that run before the first training step and report every problem at once.

Each check returns a list of problems, one sentence each that names the key (or file) and says
what to change; callers raise them together as one ``ConfigError``/``DataError`` (as chex
collects assertion failures), so a config with three mistakes takes one edit, not three runs:

    bpkit: error: 3 problems; fix them all and run again:
      - optimizer.learning_rate: got nan; use a finite number > 0 (for example 0.001).
      - optimizer.b1: got 1.5; use a number in [0, 1) (for example 0.9).
      - model.args.hidden: got 64; use a list of positive integers, such as [64, 64].

The checks come in stages, each complete before the next starts:

1. the config alone (``config_problems``): every numeric field's domain (``DOMAINS``), the
   piecewise schedule, and the model's arguments against its factory's schema
   (``MODEL_ARGS``); pure Python, so these errors come before JAX is imported;
2. the data files (``npz_problems``, ``label_problems``, ``text_problems``), when read;
3. the model against the data (``task_problems``): ``freeze``/``trainable`` patterns that match
   no parameter, the batch against the training set, the parameters against memory.

This module imports neither JAX nor the config module (which imports it): stage 3 imports JAX
inside the function.
"""
from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass
from typing import Any

INT32_MAX = 2**31 - 1
MAX_CLASSES = 100_000            # more classes than this is a labelling mistake, not a task
CLASSES_PER_EXAMPLE = 10         # ... as is more than 10 classes per training example
MAX_GENERATED_EXAMPLES = 1_000_000  # data.num_train / num_test of the generated sets


def report(problems: list[str]) -> str:
    """One message for ``problems``: the problem itself if there is one, else a list."""
    if len(problems) == 1:
        return problems[0]
    return (f"{len(problems)} problems; fix them all and run again:\n"
            + "\n".join(f"  - {p}" for p in problems))


# ----------------------------------------------------------------------------- number domains

@dataclass(frozen=True)
class Domain:
    """A numeric field's allowed values: ``lo``/``hi`` bounds (``*_open``: excluded),
    ``integer`` values only, ``null`` allowed; ``example`` goes into the message."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    null: bool = False
    example: Any = None
    why: str = ""                # appended to the message: why the bound is there

    def contains(self, value) -> bool:
        if value is None:
            return self.null
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return False
        return True

    def requirement(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            if self.integer:
                text = f"an integer from {self.lo:,} to {self.hi:,}"
            else:
                text = (f"a number in {'(' if self.lo_open else '['}{self.lo:g}, "
                        f"{self.hi:g}{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            text = f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = kind
        if self.null:
            text += " or null"
        return text

    def problem(self, key: str, value) -> str | None:
        if self.contains(value):
            return None
        example = f" (for example {self.example})" if self.example is not None else ""
        why = f" {self.why}" if self.why else ""
        return f"{key}: got {value!r}; use {self.requirement()}{example}.{why}"


def _count(lo: int = 0, hi: int = INT32_MAX, **kw) -> Domain:
    return Domain(lo, hi, integer=True, **kw)


_POSITIVE = dict(lo=0.0, lo_open=True)
_FRACTION = dict(lo=0.0, hi=1.0, hi_open=True)

# Every int and float field of every config section (tests/test_validate.py checks that none
# is missing, so a new field needs its domain here).
DOMAINS: dict[str, Domain] = {
    "run.seed": _count(0, 2**32 - 1, example=0,
                       why="JAX's PRNGKey reads the seed as an unsigned 32-bit integer."),
    "run.steps": _count(1, example=1000,
                        why="The step counter is a 32-bit integer."),
    "run.log_every": _count(1, example=50),
    "run.eval_every": _count(0, example=500, why="0 evaluates only at the end."),
    "run.checkpoint_every": _count(0, example=500, why="0 checkpoints only at the end."),
    "run.keep_checkpoints": _count(0, example=3, why="0 keeps all."),
    "run.sample_length": _count(0, 100_000, example=200),
    "run.eval_batches": _count(0, example=0, why="0 evaluates the whole test split."),
    "run.peak_flops": Domain(**_POSITIVE, null=True, example=9.89e14,
                             why="The peak FLOP/s of all the run's devices together, for "
                                 "model FLOP/s utilisation (MFU); null logs FLOP/s only."),
    "run.remat_budget_bytes": Domain(0, None, integer=True, null=True, example=2**30,
                                     why="With run.remat=auto: the most bytes the forward pass "
                                         "saves for the backward; null: no bound."),
    "run.max_skipped": _count(1, example=10,
                              why="on_nonfinite=skip stops after this many skips in a row."),
    "data.batch_size": _count(1, example=128),
    "data.eval_batch_size": _count(1, example=500),
    "data.num_train": _count(1, MAX_GENERATED_EXAMPLES, example=4000),
    "data.num_test": _count(1, MAX_GENERATED_EXAMPLES, example=1000),
    "data.context": _count(1, 100_000, example=64),
    "data.max_chars": _count(1, example=2_000_000),
    "data.noise": Domain(lo=0.0, example=0.1),
    "model.label_smoothing": Domain(**_FRACTION, example=0.1),
    "optimizer.learning_rate": Domain(**_POSITIVE, example=0.001),
    "optimizer.warmup_steps": _count(0, example=100),
    "optimizer.decay_steps": _count(1, null=True, example="null (= run.steps)"),
    "optimizer.final_lr_fraction": Domain(0.0, 1.0, example=0.1),
    "optimizer.decay_rate": Domain(0.0, 1.0, lo_open=True, example=0.5,
                                   why="It multiplies the learning rate every "
                                       "transition_steps."),
    "optimizer.transition_steps": _count(1, example=1000),
    "optimizer.momentum": Domain(**_FRACTION, example=0.9),
    "optimizer.b1": Domain(**_FRACTION, example=0.9),
    "optimizer.b2": Domain(**_FRACTION, example=0.999),
    "optimizer.eps": Domain(**_POSITIVE, example=1e-8),
    "optimizer.weight_decay": Domain(lo=0.0, example=0.01),
    "optimizer.l2_pull": Domain(lo=0.0, example=1.0),
    "optimizer.clip_norm": Domain(**_POSITIVE, null=True, example=1.0,
                                  why="A clip norm <= 0 would flip or zero the gradient; null "
                                      "turns clipping off."),
    "optimizer.accumulate_steps": _count(1, example=1),
    "optimizer.d_learning_rate": Domain(**_POSITIVE, null=True, example=0.001),
    "mesh.data": _count(1, 65_536, example=1),
    "mesh.fsdp": _count(1, 65_536, example=1),
    "distributed.num_processes": _count(1, 65_536, null=True, example=2),
    "distributed.process_id": _count(0, 65_535, null=True, example=0),
    "diagnostics.every": _count(0, example=100, why="0 turns backward-signal logging off."),
    "diagnostics.vanish_ratio": Domain(**_POSITIVE, example=1e-3),
    "diagnostics.explode_ratio": Domain(**_POSITIVE, example=1e3),
    "diagnostics.dead_fraction": Domain(0.0, 1.0, lo_open=True, example=0.25),
    "diagnostics.update_ratio_min": Domain(**_POSITIVE, example=1e-4),
    "diagnostics.update_ratio_max": Domain(**_POSITIVE, example=1e-1),
}


# ----------------------------------------------------------------------------- model arguments

ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "gelu_exact", "silu", "tanh", "sigmoid",
               "softplus", "identity")  # = sorted(bpkit.nn.ACTIVATIONS) (a test checks)


@dataclass(frozen=True)
class Arg:
    """One keyword argument of a model factory: ``kind`` is ``size`` (a positive integer),
    ``count`` (a non-negative one), ``sizes`` (a list of sizes), ``shape3`` (three of them),
    ``fraction`` ([0, 1)), ``positive`` (a number > 0), ``bool`` or ``activation``;
    ``default`` mirrors the factory's (``None``: filled from the data)."""

    kind: str
    default: Any
    doc: str
    max: int = 1_000_000

    def problem(self, key: str, value) -> str | None:
        def size_ok(v):
            return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= self.max

        if self.kind == "size" and not size_ok(value):
            example = self.default if self.default is not None else 64
            return (f"{key}: got {value!r}; use a positive integer up to {self.max:,} "
                    f"(for example {example}).")
        if self.kind == "count" and not (isinstance(value, int) and not isinstance(value, bool)
                                         and 0 <= value <= self.max):
            return (f"{key}: got {value!r}; use an integer from 0 to {self.max:,} (for example "
                    f"{self.default}).")
        if self.kind == "positive" and not (isinstance(value, (int, float))
                                            and not isinstance(value, bool)
                                            and 0 < value < float("inf")):
            return f"{key}: got {value!r}; use a finite number > 0 (for example {self.default})."
        if self.kind == "sizes" and not (isinstance(value, (list, tuple))
                                         and all(size_ok(v) for v in value)):
            example = list(self.default)
            hint = (f" (one width per layer; write [{value}] for a single layer)"
                    if size_ok(value) else "")
            return (f"{key}: got {value!r}; use a list of positive integers up to "
                    f"{self.max:,}, such as {example}{hint}.")
        if self.kind == "shape3" and not (isinstance(value, (list, tuple)) and len(value) == 3
                                          and all(size_ok(v) for v in value)):
            return (f"{key}: got {value!r}; use [height, width, channels] as three positive "
                    f"integers, such as {list(self.default)}.")
        if self.kind == "fraction" and not (isinstance(value, (int, float))
                                            and not isinstance(value, bool)
                                            and 0 <= value < 1):
            return f"{key}: got {value!r}; use a number in [0, 1) (for example 0.1)."
        if self.kind == "bool" and not isinstance(value, bool):
            return f"{key}: got {value!r}; use true or false."
        if self.kind == "activation" and value not in ACTIVATIONS:
            return (f"{key}: got {value!r}; use one of {', '.join(ACTIVATIONS)}.")
        return None


_CLASSES = Arg("size", 10, "number of classes (default: from the labels)", max=MAX_CLASSES)
_IN = Arg("size", 40, "input features (default: from the data)")
_ACT = Arg("activation", "relu", "activation function: " + " ".join(ACTIVATIONS))

# The keyword arguments of every factory in bpkit.models that a config can name, with the
# factories' defaults (tests/test_validate.py checks them against the signatures).
MODEL_ARGS: dict[str, dict[str, Arg]] = {
    "logreg": {"in_features": _IN, "num_classes": _CLASSES},
    "mlp": {"in_features": _IN, "hidden": Arg("sizes", (256, 256), "widths of the hidden "
                                                                   "layers"),
            "num_classes": _CLASSES, "activation": _ACT},
    "cnn1d": {"in_length": Arg("size", 40, "signal length (default: from the data)"),
              "channels": Arg("sizes", (32, 32, 32), "channels of each stride-2 convolution"),
              "kernel_size": Arg("size", 5, "convolution kernel width", max=1024),
              "num_classes": _CLASSES,
              "batch_norm": Arg("bool", False, "BatchNorm after each convolution")},
    "cnn2d": {"in_shape": Arg("shape3", (28, 28, 1), "[height, width, channels] of an image"),
              "channels": Arg("sizes", (16, 32), "channels of each 3x3 convolution stage"),
              "num_classes": _CLASSES,
              "batch_norm": Arg("bool", False, "BatchNorm after each convolution"),
              "dropout": Arg("fraction", 0.0, "dropout before the head during training")},
    "gru_classifier": {"in_features": Arg("size", 1, "features per time step"),
                       "hidden": Arg("size", 128, "GRU state width"),
                       "num_classes": _CLASSES},
    "lstm_classifier": {"in_features": Arg("size", 1, "features per time step"),
                        "hidden": Arg("size", 128, "LSTM state width"),
                        "num_classes": _CLASSES},
    "gpt": {"vocab_size": Arg("size", None, "vocabulary size (default: from the corpus)"),
            "d_model": Arg("size", 128, "residual stream width (a multiple of n_heads)"),
            "n_layers": Arg("size", 4, "transformer blocks", max=1024),
            "n_heads": Arg("size", 4, "attention heads per block", max=1024),
            "context": Arg("size", 128, "longest sequence (default: data.context)",
                           max=100_000),
            "dropout": Arg("fraction", 0.0, "dropout rate during training"),
            "fused": Arg("bool", True, "fused attention and layer-norm ops"),
            "lora_rank": Arg("count", 0, "LoRA adapter rank on every block projection (0: none)"),
            "lora_alpha": Arg("positive", 8.0, "LoRA scale numerator: updates are alpha/rank AB")},
    "residual_mlp": {"in_features": _IN, "width": Arg("size", 64, "units per block"),
                     "depth": Arg("size", 20, "residual blocks", max=10_000),
                     "num_classes": _CLASSES},
    "sigmoid_mlp": {"in_features": _IN, "width": Arg("size", 64, "units per layer"),
                    "depth": Arg("size", 20, "sigmoid layers", max=10_000),
                    "num_classes": _CLASSES},
    "gan_2d": {"latent_dim": Arg("size", 2, "generator input width"),
               "hidden": Arg("size", 64, "units per hidden layer")},
    "regression_mlp": {"in_features": Arg("size", 1, "input features (default: from the "
                                                     "data)"),
                       "hidden": Arg("sizes", (64, 64), "widths of the hidden layers"),
                       "out_features": Arg("size", 1, "outputs per example"),
                       "activation": Arg("activation", "tanh", _ACT.doc)},
    "seq2seq_transformer": {
        "vocab_size": Arg("size", 26, "vocabulary size (default: from the data)"),
        "d_model": Arg("size", 64, "residual stream width (a multiple of n_heads)"),
        "n_layers": Arg("size", 2, "encoder blocks, and decoder blocks", max=1024),
        "n_heads": Arg("size", 4, "attention heads per attention layer", max=1024),
        "context": Arg("size", 20, "longest sequence (default: data.context)", max=100_000),
        "dropout": Arg("fraction", 0.0, "dropout rate during training"),
        "fused": Arg("bool", True, "fused attention and layer-norm ops")},
    "ddpm_mlp": {"data_dim": Arg("size", 2, "features of a data point"),
                 "hidden": Arg("size", 128, "units per hidden layer"),
                 "depth": Arg("size", 3, "hidden layers", max=10_000),
                 "time_dim": Arg("size", 32, "sinusoidal time-embedding features"),
                 "num_steps": Arg("size", 100, "diffusion steps T", max=100_000)},
    "policy_mlp": {"obs_dim": Arg("size", 4, "observation features (default: from the env)"),
                   "num_actions": Arg("size", 2, "actions (default: from the env)"),
                   "hidden": Arg("sizes", (64, 64), "widths of the tanh hidden layers")},
}
MODEL_NAMES = tuple(MODEL_ARGS)
ALIASES = {"gru": "gru_classifier", "lstm": "lstm_classifier", "cnn": "cnn1d",
           "gan": "gan_2d"}

# What each built-in data set is, and which models and losses fit it (npz/idx: known only
# once the file is read).
DATA_KINDS = {"mnist1d": "classification", "text": "lm", "toy2d": "sampler",
              "regression1d": "regression", "digits": "classification", "reverse": "seq2seq",
              "cartpole": "env"}
_KIND_MODELS = {"lm": ("gpt",), "sampler": ("gan_2d", "ddpm_mlp"),
                "regression": ("regression_mlp",), "seq2seq": ("seq2seq_transformer",),
                "env": ("policy_mlp",)}
_KIND_LOSSES = {"classification": ("cross_entropy",), "lm": ("cross_entropy",),
                "regression": ("mse", "huber"), "sampler": ("gan", "mse"),
                "seq2seq": ("cross_entropy",), "env": ("reinforce",)}
_MODEL_LOSSES = {"gan_2d": ("gan",), "ddpm_mlp": ("mse",)}  # where the kind allows several
_KIND_WORDS = {"classification": "classification", "lm": "character-level language modelling",
               "sampler": "2-D points for a GAN or a diffusion model",
               "regression": "regression", "seq2seq": "sequence-to-sequence pairs",
               "env": "episodes of a simulated environment"}


def _close(name: str, options) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def user_model_problems(name: str) -> list[str]:
    """Problems of a ``file.py:factory`` / ``module:factory`` model name, from the text alone
    (nothing is imported: config mistakes are reported before JAX loads; the factory's
    arguments are checked against its signature when it is imported)."""
    where, _, attr = str(name).rpartition(":")
    fix = ("write model.name as path/to/file.py:factory or package.module:factory, such as "
           "my_models.py:small_mlp")
    if not where or not attr.isidentifier():
        return [f"model.name: {name!r} is not a factory reference; {fix}."]
    if where.endswith(".py"):
        if not os.path.isfile(where):
            return [f"model.name: no file {where!r} (from {os.getcwd()}); give the path of the "
                    "Python file that defines the factory, relative to the current directory "
                    "or absolute."]
    elif not all(part.isidentifier() for part in where.split(".")):
        return [f"model.name: {where!r} is neither a .py file nor a module name; {fix}."]
    return []


def model_problems(name: str, args: dict) -> list[str]:
    """``model.name`` and ``model.args`` against the factory's schema (a user's factory,
    ``file.py:factory``: see ``user_model_problems``)."""
    if ":" in str(name):
        return user_model_problems(name)
    factory = ALIASES.get(name, name)
    if factory not in MODEL_ARGS:
        return [f"model.name: unknown model {name!r}{_close(str(name), MODEL_NAMES)}; use one "
                f"of {', '.join(MODEL_NAMES)}."]
    schema = MODEL_ARGS[factory]
    problems = []
    for key, value in args.items():
        if key not in schema:
            hint = _close(str(key), schema)
            hint = (hint.replace("'", "'model.args.", 1) if hint
                    else f"; {factory} takes {', '.join(schema)}")
            problems.append(f"unknown key 'model.args.{key}' for model {factory}{hint}.")
            continue
        problem = schema[key].problem(f"model.args.{key}", value)
        if problem:
            problems.append(problem)
    if factory in ("gpt", "seq2seq_transformer") and not problems:
        d = args.get("d_model", schema["d_model"].default)
        h = args.get("n_heads", schema["n_heads"].default)
        if d % h:
            lower = max(k for k in range(1, h + 1) if d % k == 0)
            problems.append(f"model.args.n_heads: {h} heads do not divide d_model={d}; use "
                            f"n_heads={lower} or a d_model that is a multiple of {h} "
                            f"(such as {d + h - d % h}).")
    return problems


def config_problems(cfg) -> list[str]:
    """Stage 1: every problem of a ``Config`` that the config alone shows."""
    problems = []
    for key, domain in DOMAINS.items():
        section, name = key.split(".")
        problem = domain.problem(key, getattr(getattr(cfg, section), name))
        if problem:
            problems.append(problem)
    o, r, d = cfg.optimizer, cfg.run, cfg.data
    if not r.name or r.name in (".", "..") or "/" in r.name or "\\" in r.name:
        problems.append(f"run.name: got {r.name!r}; use a plain name such as mnist1d_mlp (the "
                        "run directory is runs/<name>; set run.out_dir to put it elsewhere).")
    if o.accumulate_steps > r.steps and DOMAINS["run.steps"].contains(r.steps):
        problems.append(f"optimizer.accumulate_steps: {o.accumulate_steps} micro-steps per "
                        f"update but only run.steps={r.steps}, so no update would ever be "
                        f"applied; use accumulate_steps <= run.steps.")
    problems += _piecewise_problems(o)
    for key in ("freeze", "trainable"):
        bad = [p for p in getattr(o, key) if not isinstance(p, str) or not p]
        if bad:
            problems.append(f"optimizer.{key}: {bad!r} are not path patterns; use strings such "
                            f"as \"head/*\" (fnmatch patterns on parameter paths).")
    if d.name in ("mnist1d", "regression1d") and d.batch_size > d.num_train and \
            DOMAINS["data.num_train"].contains(d.num_train):
        problems.append(f"data.batch_size: {d.batch_size} is larger than the training set "
                        f"(data.num_train={d.num_train}); use a batch size <= {d.num_train}.")
    if d.encoding is not None:
        import codecs
        try:
            codecs.lookup(d.encoding)
        except LookupError:
            problems.append(f"data.encoding: unknown encoding {d.encoding!r}; use a Python "
                            "codec name such as utf-8, latin-1 or cp1252, or null for UTF-8.")
    problems += model_problems(cfg.model.name, cfg.model.args)
    rank = cfg.model.args.get("lora_rank") if isinstance(cfg.model.args, dict) else None
    if isinstance(rank, int) and rank > 0 and not o.trainable:
        problems.append("model.args.lora_rank: LoRA trains the adapters only, but "
                        "optimizer.trainable is empty, so every weight would train; set "
                        "optimizer.trainable: [\"*lora_*\"] (add patterns such as \"head/*\" "
                        "to train more).")
    problems += _fit_problems(cfg)
    problems += _ordered(cfg.diagnostics, "vanish_ratio", "explode_ratio", "0 < ")
    problems += _dp_problems(cfg)
    problems += _ordered(cfg.diagnostics, "update_ratio_min", "update_ratio_max")
    return problems


def _ordered(section, low: str, high: str, floor: str = "") -> list[str]:
    """A problem when two valid fields of the diagnostics ``section`` are not ``low < high``."""
    lo, hi = getattr(section, low), getattr(section, high)
    if (DOMAINS[f"diagnostics.{low}"].contains(lo) and DOMAINS[f"diagnostics.{high}"].contains(hi)
            and not lo < hi):
        return [f"diagnostics.{low} ({lo}) and diagnostics.{high} ({hi}) must satisfy "
                f"{floor}{low} < {high}; swap or change them."]
    return []


def _dp_problems(cfg) -> list[str]:
    """``optimizer.dp``: known keys in their domains, and a model and engine it works with."""
    dp = cfg.optimizer.dp
    if not dp:
        return []
    problems = []
    known = {"l2_clip": "a positive number", "noise_multiplier": "a number >= 0",
             "delta": "a number in (0, 1)"}
    for key in dp:
        if key not in known:
            problems.append(f"optimizer.dp.{key}: unknown key; optimizer.dp takes "
                            + ", ".join(known) + ".")
    def number(key):
        v = dp.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    for key, ok in (("l2_clip", lambda v: v > 0), ("noise_multiplier", lambda v: v >= 0),
                    ("delta", lambda v: 0 < v < 1)):
        if key == "delta" and key not in dp:
            continue
        v = number(key)
        if v is None or not ok(v):
            problems.append(f"optimizer.dp.{key}: got {dp.get(key)!r}, expected {known[key]} "
                            "(for example optimizer.dp={l2_clip: 1.0, noise_multiplier: 1.1}).")
    if cfg.run.engine != "bpkit":
        problems.append("optimizer.dp: DP-SGD needs per-example gradient norms, which only "
                        "bpkit's engine gives; set run.engine=bpkit.")
    if cfg.model.args.get("batch_norm"):
        problems.append("optimizer.dp: a batch_norm model mixes the examples of a batch, so "
                        "it has no per-example gradients; set model.args.batch_norm=false.")
    if cfg.model.loss == "gan" or cfg.model.name in ("gan", "gan_2d"):
        problems.append("optimizer.dp: DP-SGD is not available for GAN runs (two losses).")
    return problems


def _piecewise_problems(o) -> list[str]:
    if o.schedule != "piecewise":
        if o.boundaries or o.scales:
            return [f"optimizer.boundaries/scales are set but optimizer.schedule is "
                    f"{o.schedule!r}, which ignores them; set optimizer.schedule=piecewise or "
                    "remove them."]
        return []
    problems = []
    if len(o.boundaries) != len(o.scales):
        problems.append(f"optimizer.boundaries and optimizer.scales must have the same length "
                        f"(got {len(o.boundaries)} and {len(o.scales)}); give one scale per "
                        "boundary.")
    ints = all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in o.boundaries)
    if not ints:
        problems.append(f"optimizer.boundaries: got {o.boundaries!r}; use steps as integers "
                        ">= 0, such as [500, 800].")
    elif any(a >= b for a, b in zip(o.boundaries, o.boundaries[1:])):
        problems.append(f"optimizer.boundaries: got {o.boundaries!r}; the steps must increase "
                        f"strictly, such as {sorted(set(o.boundaries))} (each scale applies "
                        "from its boundary on).")
    if not all(Domain(**_POSITIVE).contains(s) for s in o.scales):
        problems.append(f"optimizer.scales: got {o.scales!r}; use finite factors > 0, such as "
                        "[0.1, 0.1].")
    return problems


def _fit_problems(cfg) -> list[str]:
    """A built-in data set against the model and loss (npz/idx: see ``task_problems``)."""
    kind = DATA_KINDS.get(cfg.data.name)
    factory = ALIASES.get(cfg.model.name, cfg.model.name)
    if kind is None or factory not in MODEL_ARGS:
        return []
    problems = []
    words = _KIND_WORDS[kind]
    models = _KIND_MODELS.get(kind)
    if models is None:  # classification: any classifier
        others = {m for k, ms in _KIND_MODELS.items() for m in ms}
        models = tuple(m for m in MODEL_NAMES if m not in others)
    if factory not in models:
        problems.append(f"model.name: {factory} does not fit data.name={cfg.data.name} "
                        f"({words}); use " + (f"model.name={models[0]}" if len(models) == 1
                                              else f"one of {', '.join(models)}") + ".")
    losses = _MODEL_LOSSES.get(factory, _KIND_LOSSES[kind])
    if cfg.model.loss not in losses:
        problems.append(f"model.loss: {cfg.model.loss!r} does not fit "
                        + (f"model.name={factory}" if factory in _MODEL_LOSSES else
                           f"data.name={cfg.data.name} ({words})")
                        + f"; use model.loss={' or '.join(losses)}.")
    if factory == "gan_2d" and cfg.diagnostics.every:
        problems.append("diagnostics.every: backward signals are not available for GAN runs "
                        "(two losses); set diagnostics.every=0.")
    ctx = cfg.model.args.get("context")
    if kind == "lm" and isinstance(ctx, int) and ctx < cfg.data.context:
        problems.append(f"model.args.context: {ctx} is shorter than data.context="
                        f"{cfg.data.context} (the training sequence length); raise "
                        "model.args.context or remove it (it defaults to data.context).")
    return problems


# ----------------------------------------------------------------------------- data files

_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def npz_problems(arrays: dict, path: str, role: str) -> list[str]:
    """The arrays of an .npz file (``name -> ndarray``, or the exception reading it gave):
    numeric dtypes, ``x`` with ``y``, ``x_test`` with ``y_test``, matching lengths and
    feature shapes. ``role`` is the config key that names the file."""
    problems = []
    where = f"{role}: {path}"
    for name, a in arrays.items():
        if isinstance(a, Exception):
            problems.append(f"{where}: array '{name}' cannot be read ({a}); save only numeric "
                            "arrays (numpy.savez(path, x=..., y=...)).")
        elif a.dtype.kind not in _NUMERIC_KINDS:
            problems.append(f"{where}: array '{name}' has dtype {a.dtype} ({_dtype_words(a)}); "
                            "save numbers (features as floats, labels as integers), for example "
                            f"{name}.astype('float32').")
        elif a.ndim == 0 or not len(a):
            problems.append(f"{where}: array '{name}' has shape {a.shape}; it needs at least one "
                            "example along its first axis.")
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        problems.append(f"{where} holds {sorted(arrays) or 'no arrays'} but needs arrays "
                        f"named 'x' and 'y' (missing {', '.join(missing)}); save it with "
                        "numpy.savez(path, x=features, y=labels).")
    if ("x_test" in arrays) != ("y_test" in arrays):
        has, lacks = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        problems.append(f"{where} holds '{has}' but not '{lacks}'; save both (or neither, to "
                        "hold out the last 20% of x/y).")
    ok = {k: a for k, a in arrays.items() if not isinstance(a, Exception) and a.ndim > 0}
    for ys in ("y", "y_test"):
        a = ok.get(ys)
        if a is not None and a.dtype.kind in "biu" and a.ndim != 1:
            problems.append(f"{where}: '{ys}' has shape {a.shape}; integer labels must be one "
                            f"class index per example, shape (N,) (use {ys}.reshape(-1), or "
                            "argmax of one-hot rows).")
    for xs, ys in (("x", "y"), ("x_test", "y_test")):
        if xs in ok and ys in ok and len(ok[xs]) != len(ok[ys]):
            problems.append(f"{where}: '{xs}' has {len(ok[xs]):,} examples but '{ys}' has "
                            f"{len(ok[ys]):,}; they must have the same length (one label per "
                            "example).")
    if "x" in ok and "x_test" in ok and ok["x"].shape[1:] != ok["x_test"].shape[1:]:
        problems.append(f"{where}: 'x' has examples of shape {ok['x'].shape[1:]} but 'x_test' "
                        f"has {ok['x_test'].shape[1:]}; both splits need the same feature "
                        "shape.")
    return problems


def _dtype_words(a) -> str:
    return {"U": "text", "S": "bytes", "O": "Python objects", "c": "complex numbers",
            "V": "raw records", "M": "dates", "m": "time spans"}.get(a.dtype.kind, "not numbers")


def label_problems(y, y_test, path: str, role: str) -> list[str]:
    """Integer class labels: 1-D, >= 0, and few enough classes to be class indices (a label of
    10**10 would otherwise make a 10**10-way output layer)."""
    import numpy as np
    problems = []
    where = f"{role}: {path}"
    for split, labels in (("y", y), ("y_test", y_test)):
        if labels.ndim != 1:
            problems.append(f"{where}: '{split}' has shape {labels.shape}; integer labels must "
                            f"be one class index per example, shape (N,) (use "
                            f"{split}.reshape(-1) or argmax of one-hot rows).")
    if problems:
        return problems
    both = np.concatenate([np.asarray(y).ravel(), np.asarray(y_test).ravel()])
    if both.size == 0:
        return problems
    lo, hi = int(both.min()), int(both.max())
    if lo < 0:
        problems.append(f"{where}: labels go down to {lo}; class labels must be indices "
                        "0 .. K-1 (renumber them, e.g. numpy.unique(y, return_inverse=True)).")
    classes = hi + 1
    limit = min(MAX_CLASSES, CLASSES_PER_EXAMPLE * len(y))
    if classes > limit:
        cause = (f"more than {MAX_CLASSES:,}" if classes > MAX_CLASSES else
                 f"more than {CLASSES_PER_EXAMPLE} per training example ({len(y):,} examples)")
        problems.append(f"{where}: the largest label is {hi:,}, which would make {classes:,} "
                        f"classes, {cause}; class labels must be indices 0 .. K-1 (renumber "
                        "them, e.g. numpy.unique(y, return_inverse=True)), or save float "
                        "targets for regression.")
    return problems


def text_problems(raw: bytes, path: str, encoding: str | None, *, complete: bool = True
                  ) -> tuple[str | None, list[str]]:
    """``(text, problems)`` of a corpus's bytes: UTF-8 unless ``encoding`` is given, and not
    a binary file (NUL bytes) in either case unless the encoding is a UTF-16/32 one.
    ``complete=False``: ``raw`` is a prefix of the file (a character cut at its end is fine)."""
    import codecs
    enc = encoding or "utf-8"
    wide = enc.lower().replace("-", "").replace("_", "").startswith(("utf16", "utf32"))
    if b"\x00" in raw and not wide:
        at = raw.index(b"\x00")
        return None, [f"data.path: {path} contains NUL bytes (the first at byte {at:,}), so it "
                      "is a binary file, not text; give a text file."]
    try:
        return codecs.getincrementaldecoder(enc)().decode(raw, final=complete), []
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        fix = ("convert it to UTF-8, or set data.encoding to its encoding (such as latin-1 or "
               "cp1252)" if encoding is None else "check data.encoding")
        return None, [f"data.path: {path} is not {enc} text (byte 0x{raw[e.start]:02x} at "
                      f"offset {e.start:,}, line {line}, cannot be decoded); {fix}."]


# ----------------------------------------------------------------------------- model vs data

def _optimized_trees(task, params) -> list:
    """The parameter trees one optimizer sees: a GAN's two nets separately, else all."""
    return [params["generator"], params["discriminator"]] if task.kind == "gan" else [params]


def param_counts(cfg, task, params) -> tuple[int, int]:
    """``(trainable, frozen)`` parameter counts under ``optimizer.freeze``/``trainable``."""
    import jax
    import numpy as np

    from bpkit.train.optim import frozen_mask
    o = cfg.optimizer
    trainable = frozen = 0
    for tree in _optimized_trees(task, params):
        sizes = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: int(np.prod(x.shape)),
                                                                 tree))
        mask = jax.tree_util.tree_leaves(frozen_mask(tree, tuple(o.freeze), tuple(o.trainable)))
        frozen += sum(s for s, f in zip(sizes, mask) if f)
        trainable += sum(s for s, f in zip(sizes, mask) if not f)
    return trainable, frozen


def describe_params(cfg, task, params) -> str:
    """``"11,274 parameters, 1,290 trainable and 9,984 frozen"``, or ``..., all trainable``."""
    trainable, frozen = param_counts(cfg, task, params)
    detail = f"{trainable:,} trainable and {frozen:,} frozen" if frozen else "all trainable"
    return f"{trainable + frozen:,} parameters, {detail}"


def _memory_bytes() -> tuple[int | None, str]:
    """Memory of the default device and its name (None when unknown)."""
    import os

    import jax
    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU backends may not implement it
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform.upper()} memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"
    except (ValueError, OSError, AttributeError):
        return None, ""


def task_problems(cfg, ds, task) -> list[str]:
    """Stage 3: the model (shapes only, nothing allocated) against the patterns, the data's
    size and the memory."""
    import jax
    import numpy as np

    from bpkit.nn.core import param_paths
    params = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    problems = []
    o = cfg.optimizer
    trees = _optimized_trees(task, params)
    paths = sorted({p for tree in trees for p in param_paths(tree)})
    shown = ", ".join(paths[:60]) + (f", ... ({len(paths) - 60} more)" if len(paths) > 60 else "")
    for key in ("freeze", "trainable"):
        for pattern in getattr(o, key):
            if isinstance(pattern, str) and not any(fnmatch.fnmatch(p, pattern) for p in paths):
                problems.append(f"optimizer.{key}: pattern {pattern!r} matches no parameter; "
                                f"the parameter paths are {shown} (patterns are fnmatch globs, "
                                "such as \"head/*\").")
    if not problems and (o.freeze or o.trainable):
        trainable, _ = param_counts(cfg, task, params)
        if trainable == 0:
            problems.append("optimizer.freeze/trainable leave no parameter to train (every "
                            f"one of {', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''} "
                            "is frozen); loosen the patterns.")
    if ds.kind in ("classification", "regression"):
        n = len(ds.x_train)
        if cfg.data.batch_size > n:
            problems.append(f"data.batch_size: {cfg.data.batch_size} is larger than the "
                            f"training set ({n:,} examples); use a batch size <= {n:,}.")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    # float32 parameters, their gradients and up to two optimizer moments.
    need = 16 * n_params
    have, where = _memory_bytes()
    if have is not None and need > have:
        problems.append(f"model.args: the model has {n_params:,} parameters, which need about "
                        f"{need / 2**30:,.1f} GiB with gradients and optimizer state, more than "
                        f"the {have / 2**30:,.1f} GiB of {where}; make the model smaller.")
    return problems


def check_task(cfg, ds, task) -> None:
    """Raise one ``ConfigError`` listing every ``task_problems``."""
    problems = task_problems(cfg, ds, task)
    if problems:
        from bpkit.config import ConfigError
        raise ConfigError(report(problems), problems)


__all__ = ["report", "Domain", "DOMAINS", "Arg", "MODEL_ARGS", "MODEL_NAMES", "ALIASES",
           "ACTIVATIONS", "model_problems", "user_model_problems", "config_problems", "npz_problems",
           "label_problems", "text_problems", "task_problems", "check_task", "param_counts",
           "describe_params"]
