"""``bpkit launch``: real multi-process runs through ``jax.distributed`` on this machine.

Two processes with two simulated CPU devices each form one 4-device mesh (cross-process
collectives over gloo, coordinator on 127.0.0.1). They must train to the losses of one process
with four devices: the same global batches and the same jitted step, only the reduction order
of the gradient all-reduce differs, so the losses agree to float32 rounding (``LOSS_RTOL``).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bpkit.train.writers import read_jsonl
from tests.train.helpers import CONFIGS, REPO, TINY, summary, train_losses

MLP = os.path.join(CONFIGS, "mnist1d_mlp.yaml")
LOSS_RTOL = 1e-4  # float32 reduction-order differences over 30 steps (measured ~1e-7)


# Loaded at start-up by every process of a launch (sitecustomize): JAX's differentiation
# entry points raise, so a run that finishes computed its gradients with bpkit's engine.
FORBID_JAX_AUTODIFF = """
import jax
from jax._src.interpreters import ad

def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError("JAX's " + name + " was called in a training process")
    return fail

for _name in ("grad", "value_and_grad", "vjp", "jvp", "linearize", "linear_transpose"):
    setattr(jax, _name, _forbidden("jax." + _name))
ad.backward_pass = _forbidden("ad.backward_pass")
"""


def _env(devices: int | None = None, site: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        ([site] if site else []) + [REPO, os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
    return env


def launch(cwd, *args, timeout=240, site=None, **kw) -> subprocess.CompletedProcess:
    """``bpkit launch --processes 2 --local-devices 2 ARGS`` run from ``cwd``."""
    return subprocess.run([sys.executable, "-m", "bpkit.cli", "launch", "--processes", "2",
                           "--local-devices", "2", *args], cwd=cwd, env=_env(site=site),
                          capture_output=True, text=True, timeout=timeout, **kw)


def train_one(cwd, *args, devices=4) -> subprocess.CompletedProcess:
    """The same run in one process with ``devices`` simulated devices."""
    return subprocess.run([sys.executable, "-m", "bpkit.cli", "train", *args], cwd=cwd,
                          env=_env(devices), capture_output=True, text=True, timeout=240)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _assert_same_losses(a: str, b: str) -> None:
    la, lb = train_losses(a), train_losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb]
    np.testing.assert_allclose([v for _, v in la], [v for _, v in lb], rtol=LOSS_RTOL)


CLOCKS = ("examples_per_second", "wall_seconds", "flops_per_second", "mfu")  # process 0's clock


def _numbers(rec: dict, prefix: str = "") -> dict:
    """``{dotted key: value}`` of a metrics record's values (nested: backward signals)."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif k not in CLOCKS:
            out[prefix + k] = v
    return out


def _assert_same_global_metrics(a: str, b: str) -> None:
    """Every train and eval record of run ``a`` (several processes) is marked global and
    equals run ``b``'s (one process): the same keys, strings and nulls, numbers to float32
    reduction-order rounding; their summaries too."""
    ra, rb = ([r for r in read_jsonl(os.path.join(d, "metrics.jsonl"))
               if r["split"] in ("train", "eval")] for d in (a, b))
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x["scope"] == y["scope"] == "global", x
        x, y = _numbers(x), _numbers(y)
        assert set(x) == set(y)
        exact = [k for k in x if not isinstance(x[k], float)]
        assert {k: x[k] for k in exact} == {k: y[k] for k in exact}
        close = sorted(set(x) - set(exact))
        np.testing.assert_allclose([x[k] for k in close], [y[k] for k in close],
                                   rtol=LOSS_RTOL, atol=1e-7, err_msg=str(close))
    sa, sb = summary(a), summary(b)
    assert sa["scope"] == sb["scope"] == "global" and sa["processes"] == 2
    for k in ("train_loss", "eval_loss", "eval_accuracy"):
        if sb[k] is None:  # non-finite (a diverged run)
            assert sa[k] is None, (k, sa[k])
        else:
            np.testing.assert_allclose(sa[k], sb[k], rtol=LOSS_RTOL)


def test_two_processes_match_one(tmp_path):
    """2 processes x 2 devices end with the losses of 1 process x 4 devices, and every
    metrics value (train windows, evaluations, summary) is marked global and equals the one
    process's; only process 0 writes (one metrics line per step, nothing outside the run
    directory); every process computes its gradients with bpkit's engine (JAX's autodiff
    raises in them)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FORBID_JAX_AUTODIFF)
    work = tmp_path / "work"
    work.mkdir()
    args = [MLP, *TINY, "mesh.data=4"]
    res = launch(work, *args, "run.check_parity=false", site=str(site))
    _ok(res)
    assert sorted(os.listdir(work)) == ["runs"]
    run = work / "runs" / "mnist1d_mlp"
    lines = res.stdout.splitlines()
    assert any(line.startswith("[p0]   engine  bpkit;") and "2 processes" in line
               for line in lines)
    assert not [line for line in lines if line.startswith("[p1] step")]  # p1 logs nothing
    steps = [s for s, _ in train_losses(str(run))]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # each step written once
    assert summary(str(run))["processes"] == 2

    one = train_one(tmp_path, *args, f"run.out_dir={tmp_path / 'one'}")  # parity check on
    _ok(one)
    assert "parity  first batch" in one.stdout
    _assert_same_losses(str(run), str(tmp_path / "one"))
    _assert_same_global_metrics(str(run), str(tmp_path / "one"))


def test_user_errors_exit_2(tmp_path):
    res = launch(tmp_path, MLP, "distributed.process_id=1")
    assert res.returncode == 2 and "sets the distributed section itself" in res.stderr
    res = launch(tmp_path, MLP, "run.stepz=3")
    assert res.returncode == 2 and "run.stepz" in res.stderr
    res = launch(tmp_path, MLP, "mesh.data=3")  # cannot split evenly over the 2 processes
    assert res.returncode == 2 and "Make mesh.data x mesh.fsdp a multiple of 2" in res.stdout
    # the first failure is named (both processes may fail at once: then nothing is left to stop)
    assert re.search(r"process [01] exited with status 2", res.stderr)
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path):
    args = [MLP, *TINY, "mesh.data=2", "mesh.fsdp=2", "model.args.hidden=[32]"]
    _ok(launch(tmp_path, *args))
    _ok(train_one(tmp_path, *args, f"run.out_dir={tmp_path / 'one'}"))
    _assert_same_losses(str(tmp_path / "runs" / "mnist1d_mlp"), str(tmp_path / "one"))


@pytest.mark.slow
def test_nonfinite_skips_signals_and_health_are_global(tmp_path):
    """A diverging fsdp run under ``run.on_nonfinite=skip`` with backward signals and layer
    health every 2 steps: 2 processes skip the same updates, log the same signals and health
    (gathered fsdp gradients for the histograms), trace the same non-finite origin and write
    the same plots as one process with the same 4-device mesh."""
    args = [os.path.join(CONFIGS, "diverging_lr.yaml"), "run.on_nonfinite=skip",
            "run.max_skipped=100", "run.steps=12", "run.log_every=2", "diagnostics.every=2",
            "mesh.data=2", "mesh.fsdp=2", "run.progress=log"]
    res = launch(tmp_path, *args)
    _ok(res)
    assert "not written" not in res.stderr
    _ok(train_one(tmp_path, *args, f"run.out_dir={tmp_path / 'one'}"))
    run, one = str(tmp_path / "runs" / "diverging_lr"), str(tmp_path / "one")
    _assert_same_global_metrics(run, one)
    recs = {d: read_jsonl(os.path.join(d, "metrics.jsonl")) for d in (run, one)}
    assert sum(r.get("skipped", 0) for r in recs[run]) == summary(run)["skipped_steps"] > 0
    assert all("backward_signals" in r for r in recs[run] if r["split"] == "train")
    origins = {d: [(r["step"], r["nonfinite_origin"]["forward"]["primitive"],
                    r["nonfinite_origin"]["forward"]["layer"])
                   for r in recs[d] if r["split"] == "nonfinite"] for d in (run, one)}
    assert len(origins[run]) == 1 and origins[run] == origins[one]
    assert sorted(os.listdir(os.path.join(run, "plots"))) == sorted(
        os.listdir(os.path.join(one, "plots")))


@pytest.mark.slow
def test_nonfinite_stop_is_decided_by_every_process(tmp_path):
    """``run.on_nonfinite=stop``: both processes stop at the same update with the same
    message (each reads the same global loss), and process 0 logs the traced origin."""
    res = launch(tmp_path, os.path.join(CONFIGS, "diverging_lr.yaml"), "mesh.data=4",
                 "run.progress=log")
    assert res.returncode == 1, res.stdout[-3000:]
    stops = {p: [line.split(" at step ")[1].split(";")[0] for line in res.stdout.splitlines()
                 if line.startswith(f"[p{p}] bpkit: non-finite")] for p in (0, 1)}
    assert len(stops[0]) == 1 and stops[0] == stops[1], res.stdout[-3000:]
    recs = read_jsonl(str(tmp_path / "runs" / "diverging_lr" / "metrics.jsonl"))
    assert [str(r["step"]) for r in recs if r["split"] == "nonfinite"] == stops[0]


@pytest.mark.slow
def test_dp_sgd_signals_and_parity_check_are_global(tmp_path):
    """DP-SGD (per-example clipping over the global batch) with backward signals and layer
    health: 2 processes log the clipped fraction, signals and health of one process; both
    pass the first-batch parity check (a decision they take together)."""
    args = [MLP, *TINY, "mesh.data=4", "diagnostics.every=5", "run.check_parity=true",
            "optimizer.dp={l2_clip: 0.5, noise_multiplier: 1.0}"]
    res = launch(tmp_path, *args)
    _ok(res)
    assert "[p0]   parity  first batch" in res.stdout
    _ok(train_one(tmp_path, *args, f"run.out_dir={tmp_path / 'one'}"))
    run = str(tmp_path / "runs" / "mnist1d_mlp")
    _assert_same_global_metrics(run, str(tmp_path / "one"))
    train = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if r["split"] == "train"]
    assert all(0 <= r["dp_clipped_fraction"] <= 1 and "backward_signals" in r for r in train)


@pytest.mark.slow
@pytest.mark.parametrize("first", ["two", "one"])
def test_checkpoint_moves_between_process_counts(tmp_path, first):
    """A run stopped at step 20 by 2 processes resumes in 1 (and vice versa) to the
    uninterrupted run's losses."""
    base = [MLP, *TINY, "mesh.data=4", "optimizer.decay_steps=30"]  # the 20-step leg too
    _ok(train_one(tmp_path, *base, f"run.out_dir={tmp_path / 'ref'}"))
    out = f"run.out_dir={tmp_path / 'moved'}"
    legs = [lambda extra: launch(tmp_path, *base, out, *extra),
            lambda extra: train_one(tmp_path, *base, out, *extra)]
    if first == "one":
        legs.reverse()
    _ok(legs[0](["run.steps=20"]))
    res = legs[1](["run.steps=30"])
    _ok(res)
    assert "resumed from checkpoint at step 20" in res.stdout
    _assert_same_losses(str(tmp_path / "moved"), str(tmp_path / "ref"))


@pytest.mark.slow
def test_killed_process_stops_the_other_and_resumes(tmp_path):
    """SIGKILL one process mid-run: the launcher stops the other and exits non-zero; the same
    command resumes from the last checkpoint to the uninterrupted run's losses."""
    args = [MLP, *TINY, "mesh.data=4", "run.steps=200", "run.checkpoint_every=20"]
    proc = subprocess.Popen([sys.executable, "-m", "bpkit.cli", "launch", "--processes", "2",
                             "--local-devices", "2", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "mnist1d_mlp"
    deadline = time.time() + 180
    while not (run / "checkpoints" / "40").exists():  # past the first checkpoints
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    victim = _child_pids(proc.pid)[1]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "process 1 exited with status -9; stopping the others" in err
    assert not _child_pids(proc.pid)
    res = launch(tmp_path, *args)
    _ok(res)
    assert "resumed from checkpoint at step" in res.stdout
    _ok(train_one(tmp_path, *args, f"run.out_dir={tmp_path / 'ref'}"))
    _assert_same_losses(str(run), str(tmp_path / "ref"))


@pytest.mark.slow
def test_sigint_saves_in_every_process_and_resumes(tmp_path):
    """SIGINT to the launcher reaches both processes; they agree on the step to stop at, save
    one checkpoint there and exit 130; the same command resumes to the uninterrupted losses."""
    args = [MLP, *TINY, "mesh.data=4", "run.steps=400", "run.checkpoint_every=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "bpkit.cli", "launch", "--processes", "2",
                             "--local-devices", "2", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "mnist1d_mlp"
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").exists() or len(train_losses(str(run))) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "[p0] " in out and "SIGINT received: checkpoint saved at step" in out
    res = launch(tmp_path, *args)
    _ok(res)
    assert "resumed from checkpoint at step" in res.stdout
    _ok(train_one(tmp_path, *args, f"run.out_dir={tmp_path / 'ref'}"))
    _assert_same_losses(str(run), str(tmp_path / "ref"))


def _child_pids(pid: int) -> list[int]:
    """The launcher's processes in start order (process 0 first)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []
