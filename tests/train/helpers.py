"""Shared helpers for the training tests: tiny configs and a subprocess runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")

# A config small enough to train in a second or two: a 16-unit tanh MLP on MNIST-1D.
TINY = ["run.steps=30", "run.log_every=5", "run.eval_every=10", "run.checkpoint_every=10",
        "run.keep_checkpoints=0", "run.progress=log", "data.batch_size=32",
        "data.eval_batch_size=250", "model.args.hidden=[16]", "optimizer.warmup_steps=5"]


def bpkit(*args, env=None, timeout=180, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m bpkit.cli ARGS`` in a fresh process (no test-suite jax settings)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "bpkit.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def train_losses(run_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in recs if r.get("split") == "train"]


def summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)
