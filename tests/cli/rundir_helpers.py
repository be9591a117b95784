"""Shared pieces of the run-directory tests: a small config, a reference run trained once per
session from a user-like working directory, and ways to make a path read-only or a disk
full that work both as root (a private mount namespace) and as a normal user (chmod)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.cli.harness import run_cli, user_dir

CFG = "configs/mnist1d_mlp.yaml"   # relative, as a user types it
RUN = "runs/mnist1d_mlp"           # the shipped config's default run directory

# Small enough to train in a second, long enough to be killed in the middle.
LONG = ["run.steps=400", "run.log_every=50", "run.eval_every=200", "run.checkpoint_every=100",
        "run.keep_checkpoints=2", "run.progress=log", "run.check_parity=false",
        "data.batch_size=32", "data.eval_batch_size=500", "model.args.hidden=[16]",
        "optimizer.warmup_steps=20"]
# A few steps, a checkpoint every two.
SHORT = ["run.steps=6", "run.log_every=2", "run.eval_every=0", "run.checkpoint_every=2",
         "run.keep_checkpoints=0", "run.progress=log", "run.check_parity=false",
         "data.batch_size=32", "data.eval_batch_size=500", "model.args.hidden=[16]",
         "optimizer.warmup_steps=2"]


_SESSION: dict = {}  # the fixtures below are imported by several modules: computed once


@pytest.fixture(scope="session")
def fast_env(tmp_path_factory) -> dict:
    """Environment for the subprocesses: a persistent compilation cache shared by the
    session's runs (the same tiny programs compile once), nothing else changed."""
    if "env" not in _SESSION:
        cache = tmp_path_factory.mktemp("jax_cache")
        _SESSION["env"] = {"JAX_COMPILATION_CACHE_DIR": str(cache),
                           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return _SESSION["env"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, fast_env) -> str:
    """A user directory in which ``bpkit train configs/mnist1d_mlp.yaml LONG`` ran to the end
    (default relative run directory ``runs/mnist1d_mlp``). Tests copy it, never change it."""
    if "reference" not in _SESSION:
        work = user_dir(tmp_path_factory.mktemp("reference"))
        p = run_cli(work, "train", CFG, *LONG, env=fast_env)
        assert p.returncode == 0, p.stdout + p.stderr
        _SESSION["reference"] = work
    return _SESSION["reference"]


def copy_of(work: str, tmp_path) -> str:
    """A copy of the user directory ``work`` (configs and runs) to change or refuse."""
    dst = os.path.join(str(tmp_path), "copy")
    shutil.copytree(work, dst, symlinks=True)
    return dst


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _namespace_prefix() -> list[str] | None:
    """``unshare`` arguments giving a private mount namespace in which ``mount`` works, or
    ``None`` (then the real-mount tests are skipped)."""
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        if _works(prefix + ["sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"]):
            return prefix
    return None


NAMESPACE = _namespace_prefix()


def bpkit_in_namespace(cwd: str, script: str, *args: str, env: dict | None = None,
                       timeout: float = 240) -> subprocess.CompletedProcess:
    """``sh -c SCRIPT`` in a private mount namespace (``$PY`` is this Python; ``$@`` are
    ``args``): mounts made there vanish with it and never touch the machine."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PY": sys.executable, **(env or {})}
    full_env.pop("XLA_FLAGS", None)
    return subprocess.run([*NAMESPACE, "sh", "-c", script, "sh", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def run_cli_read_only(cwd: str, path: str, *args: str, env: dict | None = None):
    """``bpkit ARGS`` with ``path`` read-only: a read-only bind mount as root (where
    permission bits do not bind), ``chmod a-w`` otherwise."""
    if os.geteuid() != 0:
        mode = os.stat(path).st_mode
        os.chmod(path, 0o555)
        try:
            return run_cli(cwd, *args, env=env)
        finally:
            os.chmod(path, mode)
    if NAMESPACE is None:
        pytest.skip("running as root without a mount namespace: cannot make a read-only path")
    return bpkit_in_namespace(
        cwd, 'd="$1"; shift; mount --bind "$d" "$d" && mount -o remount,bind,ro "$d" && '
             'exec "$PY" -m bpkit.cli "$@"', path, *args, env=env)
