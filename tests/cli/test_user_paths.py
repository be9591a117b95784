"""The quick start exactly as a user runs it: from a working directory holding only
``configs/``, with the shipped configs' default relative paths (``runs/mnist1d_mlp``,
``model.init_from: runs/mnist1d_mlp``). Train -> ``bpkit eval runs/mnist1d_mlp`` -> fine-tune
from it; a run killed in the middle and resumed ends with the uninterrupted run's losses;
``run.resume=never`` moves the old run aside; ``bpkit eval`` reads a run another process is
training (no lock)."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bpkit import host_memory
from tests.cli.harness import run_cli, tree_digest, user_dir
from tests.cli.rundir_helpers import CFG, LONG, RUN, SHORT, copy_of, fast_env, reference

__all__ = ["fast_env", "reference"]  # fixtures used here


def _losses(work: str) -> list[tuple[int, float]]:
    with open(os.path.join(work, RUN, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def _summary(work: str) -> dict:
    with open(os.path.join(work, RUN, "summary.json")) as f:
        return json.load(f)


def test_train_eval_finetune_from_a_user_directory(reference, fast_env, tmp_path):
    work = copy_of(reference, tmp_path)
    with open(os.path.join(work, RUN, "config.yaml")) as f:
        stored = f.read()
    assert f"out_dir: {os.path.join(reference, RUN)}" in stored   # the resolved, absolute path
    with open(os.path.join(work, RUN, "environment.json")) as f:
        environment = json.load(f)
    if host_memory._glibc() is not None:  # run.host_memory: reuse took effect in the command
        assert environment["host_memory"] == "reused"
    options = environment["compiler_options"]  # XLA options measured faster on CPU
    assert options["xla_cpu_copy_insertion_use_region_analysis"] == "True"
    jax_0_11 = environment["jax"].startswith("0.11.")  # XLA's own convolutions except on 0.11
    assert ("xla_cpu_experimental_ynn_fusion_type" in options) != jax_0_11

    p = run_cli(work, "eval", RUN, env=fast_env)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["step"] == 400
    assert res["eval_loss"] == pytest.approx(_summary(work)["eval_loss"], rel=1e-5)

    p = run_cli(work, "train", "configs/finetune.yaml", "run.steps=4", "run.log_every=2",
                "run.eval_every=0", "run.progress=log", "run.check_parity=false",
                "data.batch_size=32", "model.args.hidden=[16]", env=fast_env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skipping" not in p.stderr and "Traceback" not in p.stderr
    with open(os.path.join(work, "runs", "finetune", "summary.json")) as f:
        assert json.load(f)["steps"] == 4


def _wait_for_checkpoint(proc, path: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended first: {proc.communicate()}"
        assert time.time() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.01)


def test_killed_and_resumed_default_path_run_is_exact(reference, fast_env, tmp_path):
    """SIGKILL after the first checkpoint, then the same command: the losses of the
    uninterrupted reference run, every logged step, exactly."""
    work = user_dir(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **fast_env}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "bpkit.cli", "train", CFG, *LONG], cwd=work,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_checkpoint(proc, os.path.join(work, RUN, "checkpoints", "100", "meta.json"))
        if proc.poll() is not None:
            pytest.skip("the run finished before it could be killed")
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finally:
        proc.kill()
    p = run_cli(work, "train", CFG, *LONG, env=fast_env)
    assert p.returncode == 0, p.stderr
    assert "resumed from checkpoint at step" in p.stdout
    assert _losses(work) == _losses(reference)
    for key in ("steps", "train_loss", "eval_loss", "eval_accuracy"):
        assert _summary(work)[key] == _summary(reference)[key], key


def test_resume_never_moves_the_old_run_aside(reference, fast_env, tmp_path):
    work = copy_of(reference, tmp_path)
    old = tree_digest(os.path.join(work, RUN))
    p = run_cli(work, "train", CFG, *SHORT, "run.resume=never", env=fast_env)
    assert p.returncode == 0, p.stderr
    moved = [d for d in os.listdir(os.path.join(work, "runs")) if d.startswith("mnist1d_mlp.old-")]
    assert len(moved) == 1 and f"moved   the previous run to" in p.stdout
    assert tree_digest(os.path.join(work, "runs", moved[0])) == old   # nothing deleted
    assert _summary(work)["steps"] == 6                                   # a new run


@pytest.mark.slow
def test_eval_reads_a_locked_run(reference, fast_env, tmp_path):
    """``bpkit eval`` takes no lock: it reads a run directory another process holds."""
    work = copy_of(reference, tmp_path)
    fd = os.open(os.path.join(work, RUN, "train.lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        p = run_cli(work, "eval", RUN, env=fast_env)
    finally:
        os.close(fd)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["step"] == 400
