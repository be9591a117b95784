"""The bad-input suite's runner: the ``bpkit`` command as a user runs it.

Every case runs ``python -m bpkit.cli ...`` in a fresh process whose working directory is a
temporary copy of the user's side of a clone (``configs/`` and any files the case writes), so
the shipped configs' default relative ``runs/<name>`` directories are used exactly as a user
gets them. A refused input must exit with the expected status, print no Python traceback,
name the problem, and leave an existing run directory byte-for-byte unchanged.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")


def user_dir(tmp_path) -> str:
    """A working directory laid out as a user's clone is: ``configs/`` and nothing else."""
    work = os.path.join(str(tmp_path), "work")
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(work, "configs")):
        shutil.copytree(CONFIGS, os.path.join(work, "configs"))
    return work


def run_cli(cwd: str, *args: str, env: dict | None = None, timeout: float = 240,
            **kw) -> subprocess.CompletedProcess:
    """``bpkit ARGS`` in a fresh process started in ``cwd`` (no test-suite jax settings)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "bpkit.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def tree_digest(path: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path`` (empty if it does not exist)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_refused(p: subprocess.CompletedProcess, status: int, *words: str) -> None:
    """The process exited with ``status``, printed no traceback, and its output names every
    one of ``words`` (case-insensitive)."""
    out = p.stdout + p.stderr
    assert p.returncode == status, f"exit {p.returncode}, expected {status}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    missing = [w for w in words if w.lower() not in out.lower()]
    assert not missing, f"output does not name {missing}:\n{out[-3000:]}"
