"""Resuming is explicit and safe: which config changes a run directory accepts, and restoring.

``run.resume`` decides what ``bpkit train`` does with an existing run directory:

    auto   resume it if the new config has the same trajectory as the stored one (default)
    never  move it aside to ``<dir>.old-<timestamp>`` (nothing is deleted) and start afresh
    must   resume it, or exit 2 if there is nothing to resume

The *trajectory* of a run is everything that decides its parameters at every step: model, data,
optimizer, seed, engine, ... Keys that do not (``RESUMABLE``: how long, how often to log,
evaluate and checkpoint, progress display, failure policy, where the run lives, and the
device mesh, whose checkpoints hold whole arrays) may change on resume. Any other difference
stops the run before anything is written, naming each key with its old and new values.
``optimizer.decay_steps: null`` follows ``run.steps`` for the linear and cosine schedules, so
extending such a run changes its schedule and is refused like any other trajectory change.
"""
from __future__ import annotations

import dataclasses
import json
import os

import yaml

from bpkit.config import flatten
from bpkit.paths import PATH_KEYS, absolute
from bpkit.train import checkpoint as ckpt
from bpkit.train.writers import RunDirError

# Keys (or sections, ending in ".") that may differ between a run and its resumption.
RESUMABLE = ("run.name", "run.out_dir", "run.steps", "run.log_every", "run.eval_every",
             "run.eval_batches", "run.checkpoint_every", "run.keep_checkpoints",
             "run.progress", "run.resume", "run.on_nonfinite", "run.max_skipped",
             "run.check_parity", "run.sample_length", "run.peak_flops", "run.remat",
             "run.remat_budget_bytes", "run.host_memory", "run.xla_options",
             "data.eval_batch_size",
             "data.cache_dir",
             "diagnostics.", "mesh.", "distributed.")
_PATHS = {f"{s}.{k}" for s, k in PATH_KEYS}
_DECAYING = ("linear", "cosine")  # schedules that run over optimizer.decay_steps


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def trajectory(flat: dict) -> dict:
    """The trajectory keys of a flattened config, paths absolute, with ``decay_steps: null``
    replaced by the number of optimizer steps it stands for."""
    out = {k: v for k, v in flat.items() if not _resumable(k)}
    for k in _PATHS & out.keys():
        if isinstance(out[k], str) and out[k]:
            out[k] = absolute(out[k])  # a config.yaml written before paths were resolved
    if out.get("optimizer.decay_steps") is None and flat.get("optimizer.schedule") in _DECAYING:
        steps = flat.get("run.steps") or 0
        out["optimizer.decay_steps"] = max(steps // (flat.get("optimizer.accumulate_steps") or 1), 1)
    return out


def _defaults() -> dict:
    from bpkit.config import Config
    return flatten(json.loads(json.dumps(dataclasses.asdict(Config()))))


def _normal(cfg_dict: dict) -> dict:
    """A config dict as YAML stores it (tuples as lists, ...), flattened over the defaults."""
    return {**_defaults(), **flatten(yaml.safe_load(yaml.safe_dump(cfg_dict)) or {})}


def read_stored(config_path: str) -> dict:
    """The flattened config a run directory stores; ``RunDirError`` if it cannot be read."""
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise RunDirError(f"cannot read the stored config {config_path} ({reason}), so this run "
                          "cannot be checked for resuming; train into another run.out_dir, or "
                          "start over with run.resume=never (the old directory is kept, "
                          "renamed)") from None
    if not isinstance(raw, dict):
        raise RunDirError(f"{config_path} is not a bpkit config; train into another "
                          "run.out_dir, or start over with run.resume=never")
    return _normal(raw)


def differences(stored: dict, new: dict) -> list[tuple[str, object, object]]:
    """``[(key, old, new)]`` of the trajectory keys that differ (keys the stored config does
    not know, from another bpkit version, are compared with their defaults)."""
    old_t, new_t = trajectory(stored), trajectory(new)
    return [(k, old_t.get(k), new_t.get(k)) for k in sorted(old_t.keys() | new_t.keys())
            if old_t.get(k) != new_t.get(k) and k in new_t]


def changed_resumable(stored: dict, new: dict) -> list[tuple[str, object, object]]:
    """``[(key, old, new)]`` of the resumable keys that differ (reported, not refused)."""
    skip = ("run.name", "run.out_dir", "run.resume")
    return [(k, stored.get(k), v) for k, v in sorted(new.items())
            if _resumable(k) and k not in skip and stored.get(k) != v]


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def check_compatible(run_dir: str, config_path: str, cfg) -> list[tuple[str, object, object]]:
    """Refuse (``RunDirError``) if ``cfg`` would change the trajectory of the run stored in
    ``run_dir``; else return the resumable keys that changed."""
    stored, new = read_stored(config_path), _normal(cfg.to_dict())
    diffs = differences(stored, new)
    if diffs:
        lines = "\n".join(f"  {k}: {_show(a)} -> {_show(b)}" for k, a, b in diffs)
        note = ""
        decay = [a for k, a, _ in diffs if k == "optimizer.decay_steps"]
        if decay and stored.get("optimizer.decay_steps") is None:
            note = ("\n(optimizer.decay_steps: null follows run.steps, so more steps stretch the "
                    "learning-rate schedule; optimizer.decay_steps="
                    f"{decay[0]} keeps the old one, past which the rate stays at its final value)")
        raise RunDirError(
            f"{run_dir} holds a run with a different config, and continuing it with this one "
            f"would change its trajectory:\n{lines}{note}\nNothing was changed. Train into a new "
            "directory (run.out_dir=...), or start over with run.resume=never (the old run "
            f"is moved to {run_dir}.old-<timestamp>, not deleted).")
    return changed_resumable(stored, new)


def describe_changes(changes) -> str:
    return ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in changes)


def restore_or_start(ckpt_dir: str, state, mode: str, warn):
    """``(start step, state)``: the newest good checkpoint under ``ckpt_dir``, or ``(0,
    state)`` when there is none (``mode="must"``: ``RunDirError``). Partial and corrupt
    checkpoints are skipped with a warning; an unreadable one raises
    ``checkpoint.CheckpointUnreadable``."""
    step, restored = ckpt.restore_latest(ckpt_dir, state, warn=warn)
    if restored is not None:
        return step, restored
    if mode == "must":
        raise RunDirError(f"run.resume=must, but {ckpt_dir} holds no usable checkpoint to "
                          "resume from; nothing was changed (use run.resume=auto to start "
                          "afresh)")
    return 0, state


def nothing_to_resume(ckpt_dir: str) -> bool:
    return not ckpt.complete_steps(ckpt_dir) if os.path.isdir(ckpt_dir) else True
