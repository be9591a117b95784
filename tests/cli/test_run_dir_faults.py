"""Bad inputs and faults around the run directory, through the ``bpkit`` command as a user runs
it (from a working directory holding ``configs/``, default ``runs/<name>`` paths).

Each case asserts the exit status, that no traceback is printed, that the message names the
problem, and -- where the command is refused -- that the existing run directory is
byte-for-byte unchanged. ``FAULTS`` is the table of commands; signals, a closed stdout and full
disks follow as their own tests. The run refused or damaged is a copy of one reference run
trained once per session (``rundir_helpers.reference``).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from tests.cli.harness import assert_refused, run_cli, tree_digest, user_dir
from tests.cli.rundir_helpers import (CFG, LONG, NAMESPACE, RUN, SHORT, bpkit_in_namespace,
                                      copy_of, fast_env, reference, run_cli_read_only)

__all__ = ["fast_env", "reference"]  # fixtures used here

NAN_SGD = ["optimizer.name=sgd", "optimizer.learning_rate=1e12", "optimizer.schedule=constant",
           "optimizer.warmup_steps=0"]


def strict_json_lines(path: str) -> list[dict]:
    """The records of a JSON-lines file, failing on a bare NaN/Infinity (not JSON)."""
    def refuse(name):
        raise AssertionError(f"{path} holds a bare {name}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


# ----------------------------------------------------------------------------- preparations

def _remove_all_meta(work):
    ckpts = os.path.join(work, RUN, "checkpoints")
    for step in os.listdir(ckpts):
        os.remove(os.path.join(ckpts, step, "meta.json"))


def _blocker(work):
    with open(os.path.join(work, "blocker"), "w") as f:
        f.write("a regular file\n")


def _foreign_dir(work):
    os.makedirs(os.path.join(work, "notes"))
    with open(os.path.join(work, "notes", "todo.txt"), "w") as f:
        f.write("my own notes\n")


def _garbage_config(work):
    with open(os.path.join(work, RUN, "config.yaml"), "w") as f:
        f.write("run: {name: [unclosed\n")


def _no_config(work):
    os.remove(os.path.join(work, RUN, "config.yaml"))


def _npz_with(bad: str, value: float):
    def prepare(work):
        rng = np.random.default_rng(0)
        arrays = {"x": rng.normal(size=(200, 8)).astype(np.float32),
                  "y": rng.integers(0, 3, 200).astype(np.int32),
                  "x_test": rng.normal(size=(50, 8)).astype(np.float32),
                  "y_test": rng.integers(0, 3, 50).astype(np.int32)}
        for idx in ((5, 2), (7, 0), (9, 1)):
            arrays[bad][idx] = value
        os.makedirs(os.path.join(work, "data"))
        np.savez(os.path.join(work, "data", "bad.npz"), **arrays)
    return prepare


def _break_newest_checkpoint(work):
    """Not damage a checksum catches: a file orbax needs is gone."""
    os.remove(os.path.join(work, RUN, "checkpoints", "400", "state", "_METADATA"))


def _hold_lock(work):
    fd = os.open(os.path.join(work, RUN, "train.lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd  # released when the case closes it


# ----------------------------------------------------------------------------- checks

def _no_run_dir(work, p):
    assert not os.path.exists(os.path.join(work, RUN))


def _stopped_before_bad_step(work, p):
    """Nothing saved at or after the step the message names; it names the survivor."""
    err = p.stderr
    bad = int(err.split("at step ")[1].split(";")[0])
    ckpts = os.path.join(work, RUN, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpts)) if os.path.isdir(ckpts) else []
    assert steps and all(s < bad for s in steps), (steps, err)
    assert f"The newest checkpoint, step {steps[-1]}" in err
    lines = strict_json_lines(os.path.join(work, RUN, "metrics.jsonl"))
    last = [r for r in lines if r["split"] == "train"][-1]
    assert last["step"] == bad and last["loss"] is None and "loss" in last["nonfinite"]
    assert lines[-1]["split"] == "nonfinite"  # then where it came from (train/explain.py)


def _no_checkpoint_yet(work, p):
    ckpts = os.path.join(work, RUN, "checkpoints")
    assert not os.path.isdir(ckpts) or not os.listdir(ckpts)


def _skips_logged_as_null(work, p):
    recs = strict_json_lines(os.path.join(work, RUN, "metrics.jsonl"))
    assert sum(r.get("skipped", 0) for r in recs) >= 3   # the last window is logged too
    assert any(r.get("loss") is None and "loss" in r.get("nonfinite", []) for r in recs)


@dataclass
class Fault:
    id: str
    args: list[str]                           # the bpkit command line
    status: int
    words: list[str]                          # the output names all of these
    prepare: Callable | None = None           # on the user directory, before the command
    base: bool = True                         # start from a copy of the reference run
    check: Callable | None = None             # further assertions (work dir, process)
    read_only: str | None = None              # this path (relative) is read-only
    any_words: list[str] = field(default_factory=list)  # the output names one of these
    slow: bool = False

    @property
    def unchanged(self) -> bool:
        """A refused command leaves the reference copy exactly as it was."""
        return self.base and self.status == 2


def _trajectory(override: str, key: str, new: str, slow: bool = True) -> Fault:
    return Fault(f"changes-{key}", ["train", CFG, *LONG, override], 2,
                 [key, new, "run.out_dir", "run.resume=never", "Nothing was changed"],
                 slow=slow)


TRAIN = ["train", CFG]
FAULTS = [
    # A config that would change the stored run's trajectory (one key each).
    _trajectory("optimizer.learning_rate=0.01", "optimizer.learning_rate", "0.01", slow=False),
    _trajectory("run.seed=1", "run.seed", "-> 1", slow=False),
    _trajectory("model.args.hidden=[32]", "model.args.hidden", "[32]", slow=False),
    _trajectory("model.args.activation=relu", "model.args.activation", "relu"),
    _trajectory("data.num_train=2000", "data.num_train", "2000"),
    _trajectory("data.batch_size=64", "data.batch_size", "64"),
    _trajectory("optimizer.name=sgd", "optimizer.name", "sgd"),
    _trajectory("optimizer.weight_decay=0.1", "optimizer.weight_decay", "0.1"),
    _trajectory("optimizer.clip_norm=1.0", "optimizer.clip_norm", "1.0"),
    _trajectory("optimizer.warmup_steps=5", "optimizer.warmup_steps", "5"),
    _trajectory("run.engine=jax", "run.engine", "jax"),
    _trajectory("model.compute_dtype=bfloat16", "model.compute_dtype", "bfloat16"),
    _trajectory("model.label_smoothing=0.1", "model.label_smoothing", "0.1"),
    Fault("longer-cosine-schedule", [*TRAIN, *LONG, "run.steps=500"], 2,
          ["optimizer.decay_steps", "400 -> 500", "null follows run.steps"]),
    # run.resume=must with nothing to resume.
    Fault("must-without-run", [*TRAIN, *SHORT, "run.resume=must"], 2,
          ["run.resume=must", "no checkpoint"], base=False, check=_no_run_dir),
    Fault("must-with-only-partial-checkpoints", [*TRAIN, *LONG, "run.resume=must"], 2,
          ["run.resume=must", "no checkpoint"], prepare=_remove_all_meta, slow=True),
    # Another process holds the run directory.
    Fault("lock-held", [*TRAIN, *LONG], 2, ["in use by another bpkit process",
                                            f"PID {os.getpid()}", "train.lock"],
          prepare=_hold_lock),
    # Impossible or unwritable run directories.
    Fault("out-dir-under-a-file", [*TRAIN, *SHORT, "run.out_dir=blocker/run"], 2,
          ["blocker/run", "Not a directory"], prepare=_blocker, base=False),
    Fault("out-dir-is-a-file", [*TRAIN, *SHORT, "run.out_dir=blocker"], 2,
          ["blocker", "is a file"], prepare=_blocker, base=False, slow=True),
    Fault("out-dir-read-only", [*TRAIN, *LONG], 2, [RUN, "train.lock"],
          any_words=["Read-only file system", "Permission denied"], read_only=RUN),
    Fault("out-dir-parent-read-only", [*TRAIN, *SHORT, "run.out_dir=ro/run"], 2, ["ro/run"],
          any_words=["Read-only file system", "Permission denied"], base=False,
          prepare=lambda w: os.makedirs(os.path.join(w, "ro")), read_only="ro", slow=True),
    Fault("out-dir-holds-other-files", [*TRAIN, *SHORT, "run.out_dir=notes"], 2,
          ["notes", "todo.txt", "no bpkit run"], prepare=_foreign_dir, slow=True),
    # A run directory that cannot be checked.
    Fault("stored-config-unreadable", [*TRAIN, *LONG], 2,
          ["cannot read the stored config", "config.yaml", "run.resume=never"],
          prepare=_garbage_config),
    Fault("checkpoints-without-config", [*TRAIN, *LONG], 2, ["no config.yaml", "run.out_dir"],
          prepare=_no_config, slow=True),
    # Checkpoints that exist but cannot be read (not a failed checksum): stop, change nothing.
    Fault("checkpoint-unreadable", [*TRAIN, *LONG], 2,
          ["checkpoints/400", "cannot be read", "orbax", "nothing was changed"],
          prepare=_break_newest_checkpoint),
    Fault("eval-checkpoint-unreadable", ["eval", RUN], 2,
          ["checkpoints/400", "cannot be read"], prepare=_break_newest_checkpoint, slow=True),
    # Non-finite input values.
    Fault("nan-in-x", [*TRAIN, *SHORT, "data.name=npz", "data.path=data/bad.npz"], 2,
          ["data/bad.npz", "holds 3 non-finite values", "x[5, 2]"],
          prepare=_npz_with("x", np.nan), base=False),
    Fault("inf-in-x-test", [*TRAIN, *SHORT, "data.name=npz", "data.path=data/bad.npz"], 2,
          ["x_test", "3 non-finite values", "x_test[5, 2]"],
          prepare=_npz_with("x_test", np.inf), base=False, slow=True),
    # A data cache that cannot be written.
    Fault("cache-dir-unwritable", [*TRAIN, *SHORT, "data.cache_dir=blocker/cache",
                                   "data.num_train=200", "data.num_test=100"], 2,
          ["MNIST-1D cache", "blocker/cache", "Not a directory", "data.cache_dir"],
          prepare=_blocker, base=False),
    # Non-finite loss or gradient during training.
    Fault("nonfinite-stop", [*TRAIN, *SHORT, *NAN_SGD], 1,
          ["non-finite loss", "stopping without saving anything new", "run.on_nonfinite=skip"],
          base=False, check=_stopped_before_bad_step),
    Fault("nonfinite-stop-before-any-checkpoint",
          [*TRAIN, *SHORT, *NAN_SGD, "run.checkpoint_every=0"], 1,
          ["non-finite loss", "No checkpoint exists yet"], base=False,
          check=_no_checkpoint_yet, slow=True),
    Fault("nonfinite-skip-max-skipped",
          [*TRAIN, *SHORT, *NAN_SGD, "run.steps=40", "run.on_nonfinite=skip",
           "run.max_skipped=3"], 1,
          ["3 updates in a row", "run.max_skipped=3", "skipped"], base=False,
          check=_skips_logged_as_null),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] * c.slow)
                                  for c in FAULTS])
def test_fault(case: Fault, reference, fast_env, tmp_path):
    work = copy_of(reference, tmp_path) if case.base else user_dir(tmp_path)
    held = case.prepare(work) if case.prepare else None
    before = tree_digest(os.path.join(work, RUN))
    try:
        if case.read_only:
            p = run_cli_read_only(work, os.path.join(work, case.read_only), *case.args,
                                  env=fast_env)
        else:
            p = run_cli(work, *case.args, env=fast_env)
    finally:
        if isinstance(held, int):
            os.close(held)
    assert_refused(p, case.status, *case.words)
    out = p.stdout + p.stderr
    if case.any_words:
        assert any(w in out for w in case.any_words), out[-3000:]
    if case.unchanged:
        assert tree_digest(os.path.join(work, RUN)) == before
    if case.check:
        case.check(work, p)


def test_the_table_is_big_enough():
    assert len(FAULTS) >= 25 and len({c.id for c in FAULTS}) == len(FAULTS)


# ----------------------------------------------------------------------------- signals, pipes

def _popen(work, *args, env):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    full_env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "bpkit.cli", *args], cwd=work, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until(proc, prefix: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting {prefix!r}: {''.join(lines)}{proc.stderr.read()}")


MANY = [*SHORT, "run.steps=1000000", "run.log_every=5", "run.checkpoint_every=0"]


def test_sighup_saves_like_sigterm(fast_env, tmp_path):
    work = user_dir(tmp_path)
    proc = _popen(work, *TRAIN, *MANY, env=fast_env)
    try:
        _read_until(proc, "step ")
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "Traceback" not in out + err
    step = int(out.split("SIGHUP received: checkpoint saved at step ")[1].split()[0])
    assert os.path.exists(os.path.join(work, RUN, "checkpoints", str(step), "meta.json"))


def test_sigint_before_training_stops_at_once(fast_env, tmp_path):
    """Ctrl-C while the data is generated (a fresh cache) is honoured: exit 130, nothing
    saved, no traceback."""
    work = user_dir(tmp_path)
    proc = _popen(work, *TRAIN, *MANY, "data.cache_dir=fresh_cache", env=fast_env)
    try:
        _read_until(proc, "bpkit train:")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err and "SIGINT received" in out + err
    _no_checkpoint_yet(work, None)


def test_closed_stdout_keeps_training(fast_env, tmp_path):
    """``bpkit train ... | head -1``: printing stops, the run finishes, no BrokenPipeError."""
    work = user_dir(tmp_path)
    proc = _popen(work, *TRAIN, *SHORT, env=fast_env)
    try:
        first = proc.stdout.readline()
        proc.stdout.close()                       # the reader goes away, as head does
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert first.startswith("bpkit train:")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    with open(os.path.join(work, RUN, "summary.json")) as f:
        assert json.load(f)["steps"] == 6


# ----------------------------------------------------------------------------- full disks

def test_failed_checkpoint_write_keeps_the_previous_ones(tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of the second checkpoint write, simulated in this process (orbax's
    save writes part of its files, then fails as a full disk does): exit 2 naming the path and
    the OS error; the first checkpoint is intact and restorable, nothing partial is left.
    A real full filesystem: test_disk_full_on_a_real_filesystem."""
    import errno

    import orbax.checkpoint as ocp

    from bpkit import cli
    from bpkit.train import checkpoint as ckpt
    from tests.numerics import user_numerics

    real_save = ocp.PyTreeCheckpointer.save
    calls = []

    def save(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "half_written"), "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(self, path, *a, **kw)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", save)
    monkeypatch.chdir(user_dir(tmp_path))
    with user_numerics():
        code = cli.main([*TRAIN, *SHORT])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "No space left on device" in err and "checkpoints/.tmp-4" in err, err
    ckpts = os.path.abspath(os.path.join(RUN, "checkpoints"))
    assert os.listdir(ckpts) == ["2"]
    with open(os.path.join(ckpts, "2", "meta.json")) as f:
        meta = json.load(f)
    assert len(ckpt.restore_leaves(os.path.join(ckpts, "2"))) == meta["num_leaves"]


@pytest.mark.slow
@pytest.mark.skipif(NAMESPACE is None, reason="needs a private mount namespace for a tmpfs")
def test_disk_full_on_a_real_filesystem(fast_env, tmp_path):
    """The run directory on a 400 KiB tmpfs (in a private mount namespace) fills up while
    training: exit 2 naming the path and ENOSPC; every checkpoint already written restores
    (``bpkit eval`` on a copy taken before the namespace goes)."""
    work = user_dir(tmp_path)
    os.makedirs(os.path.join(work, RUN))
    script = ('mount -t tmpfs -o size=400k tmpfs "$1" || exit 99; shift; "$PY" -m bpkit.cli '
              '"$@"; rc=$?; cp -a runs/mnist1d_mlp/. copy/; exit $rc')
    os.makedirs(os.path.join(work, "copy"))
    p = bpkit_in_namespace(work, script, os.path.join(work, RUN), *TRAIN, *SHORT,
                           "run.steps=400", "run.checkpoint_every=1", "run.log_every=1",
                           env=fast_env)
    assert p.returncode != 99, p.stderr
    assert_refused(p, 2, "No space left on device")
    steps = sorted(int(s) for s in os.listdir(os.path.join(work, "copy", "checkpoints"))
                   if s.isdigit())
    assert steps, "nothing was written before the disk filled"
    shutil.rmtree(os.path.join(work, RUN))
    shutil.move(os.path.join(work, "copy"), os.path.join(work, RUN))
    e = run_cli(work, "eval", RUN, env=fast_env)
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout.strip().splitlines()[-1])["step"] == steps[-1]
