"""Checkpoint and resume: a SIGKILLed run restarted with the same command ends with exactly the
losses of an uninterrupted run; SIGTERM saves and exits cleanly; a damaged checkpoint is
skipped with a warning; a non-finite loss stops the run naming the step."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bpkit import cli
from tests.train.helpers import CONFIGS, REPO, TINY, bpkit, summary, train_losses

CFG = os.path.join(CONFIGS, "mnist1d_mlp.yaml")
LONG = TINY + ["run.steps=800", "run.log_every=50", "run.eval_every=400",
               "run.checkpoint_every=100", "run.keep_checkpoints=3", "run.check_parity=false"]


def _popen(run_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "bpkit.cli", "train", CFG, *LONG,
                             f"run.out_dir={run_dir}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, run_dir, step, timeout=120):
    meta = os.path.join(run_dir, "checkpoints", str(step), "meta.json")
    deadline = time.time() + timeout
    while not os.path.exists(meta):
        assert proc.poll() is None, f"run ended before checkpoint {step}: {proc.communicate()}"
        assert time.time() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    p = bpkit("train", CFG, *LONG, f"run.out_dir={run}")
    assert p.returncode == 0, p.stderr
    return run


def test_sigkill_then_resume_is_bit_identical(reference, tmp_path):
    run = tmp_path / "killed"
    proc = _popen(run)
    _wait_for_checkpoint(proc, run, 200)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    p = bpkit("train", CFG, *LONG, f"run.out_dir={run}")
    assert p.returncode == 0, p.stderr
    assert "resumed from checkpoint at step" in p.stdout
    assert train_losses(run) == train_losses(reference)  # exact equality, every logged step
    a, b = summary(run), summary(reference)
    for key in ("steps", "train_loss", "eval_loss", "eval_accuracy"):
        assert a[key] == b[key], key


def test_damaged_checkpoint_falls_back_to_the_previous(reference, tmp_path):
    import shutil
    run = tmp_path / "damaged"
    shutil.copytree(reference, run)
    ckpt = run / "checkpoints"
    assert sorted(os.listdir(ckpt), key=int) == ["600", "700", "800"]
    os.remove(ckpt / "800" / "meta.json")                   # partial: never committed
    state_dir = ckpt / "700" / "state"
    data_files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs
                  if os.path.basename(r) == "d"]
    assert data_files
    for path in data_files:                                   # corrupt: flipped bytes
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
                data[i] ^= 0xFF
            f.seek(0)
            f.write(bytes(data))
    p = bpkit("train", CFG, *LONG, f"run.out_dir={run}")
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert "skipping checkpoint" in out and "800" in out and "700" in out
    assert "resumed from checkpoint at step 600" in out
    assert train_losses(run) == train_losses(reference)
    assert summary(run)["eval_loss"] == summary(reference)["eval_loss"]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "term"
    proc = _popen(run)
    _wait_for_checkpoint(proc, run, 100)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "SIGTERM received: checkpoint saved at step" in out
    step = int(out.split("checkpoint saved at step ")[1].split()[0])
    assert os.path.exists(run / "checkpoints" / str(step) / "meta.json")


def test_nonfinite_loss_stops_naming_the_step(tmp_path, capsys):
    run = tmp_path / "nan"
    code = cli.main(["train", CFG, *TINY, "optimizer.name=sgd", "optimizer.learning_rate=1e12",
                     "optimizer.schedule=constant", "optimizer.warmup_steps=0",
                     "run.check_parity=false", f"run.out_dir={run}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite loss" in err and "at step" in err and "Traceback" not in err
    bad = int(err.split("at step ")[1].split(";")[0])
    # No checkpoint at or after the bad step.
    steps = [int(s) for s in os.listdir(run / "checkpoints")] if (run / "checkpoints").exists() else []
    assert all(s < bad for s in steps)


def test_nonfinite_loss_can_be_skipped(tmp_path, capsys):
    run = tmp_path / "skip"
    code = cli.main(["train", CFG, *TINY, "optimizer.name=sgd", "optimizer.learning_rate=1e12",
                     "optimizer.schedule=constant", "optimizer.warmup_steps=0",
                     "run.on_nonfinite=skip", "run.max_skipped=1000", "run.check_parity=false",
                     f"run.out_dir={run}"])
    assert code == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert sum(r.get("skipped", 0) for r in recs) > 0
    assert summary(run)["skipped_steps"] == sum(r.get("skipped", 0) for r in recs)
