"""A run directory read back: its config, summary, metrics and learning-rate schedule.

Used by the plots, ``bpkit compare``, ``bpkit sweep``, the HTML report and the TensorBoard
writer; it never imports JAX except to evaluate a schedule (``learning_rates``).
"""
from __future__ import annotations

import json
import os

import numpy as np
import yaml

from bpkit.train.plots import read_metrics  # noqa: F401  (re-exported: one reader)


def read_config(run_dir: str) -> dict:
    """The run's ``config.yaml`` as a plain nested dict (``{}`` if there is none)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def read_summary(run_dir: str) -> dict | None:
    """``summary.json``, or ``None`` for a run that has not finished (or stopped early)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_name(run_dir: str) -> str:
    """``run.name`` from the run's config, else the directory's name."""
    name = read_config(run_dir).get("run", {}).get("name")
    return str(name) if name else os.path.basename(os.path.normpath(run_dir))


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.yaml")) or os.path.isfile(
        os.path.join(path, "metrics.jsonl"))


def learning_rates(cfg, steps: np.ndarray, *, discriminator: bool = False) -> np.ndarray:
    """The learning rate the optimizer applied at each 1-based ``steps`` (the step that ends
    with the update), straight from the config's schedule: ``schedule((step - 1) //
    accumulate_steps)``, as ``make_train_step`` reports it. ``discriminator``: the GAN
    discriminator's schedule (``optimizer.d_learning_rate``)."""
    from bpkit.train.optim import build_optimizer
    o = cfg.optimizer
    lr = (o.d_learning_rate or o.learning_rate) if discriminator else None
    _, schedule = build_optimizer(o, cfg.run.steps, learning_rate=lr)
    count = (np.asarray(steps, np.int64) - 1) // max(o.accumulate_steps, 1)
    return np.broadcast_to(np.asarray(schedule(count), np.float64), count.shape).copy()


def run_config(run_dir: str):
    """The run's ``Config`` (checked as ``bpkit train`` checks it), or ``None`` when the
    directory has no readable config."""
    from bpkit.config import ConfigError, load_config
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        return load_config(path, [])
    except (ConfigError, OSError):
        return None


def learning_rate_curves(run_dir: str, last_step: int, train: list[dict]) -> dict:
    """``{"learning_rate": (steps, rates), "d_learning_rate": ...}`` at every step
    ``1..last_step`` from the schedule in the run's config (each only where the run logged
    that key); ``{}`` without a readable config."""
    cfg = run_config(run_dir)
    if cfg is None or last_step < 1:
        return {}
    steps = np.arange(1, last_step + 1)
    curves = {}
    for key, disc in (("learning_rate", False), ("d_learning_rate", True)):
        if any(key in r for r in train):
            curves[key] = (steps, learning_rates(cfg, steps, discriminator=disc))
    return curves
