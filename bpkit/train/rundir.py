"""The run directory: the user's record of a run, never lost and never silently replaced.

    <out_dir>/config.yaml      the resolved config (absolute paths, every default filled in)
    <out_dir>/metrics.jsonl    one strict-JSON record per logged step / evaluation
    <out_dir>/summary.json     the final numbers
    <out_dir>/checkpoints/<step>/
    <out_dir>/plots/*.png
    <out_dir>/train.lock       flock'ed by the process training into it (holds its PID)

``open_run(cfg)`` prepares it *before anything is written*: it creates the directory (or says
in one sentence why it cannot), takes the lock, and for an existing run applies
``run.resume`` (see ``bpkit.train.resume``): refuse a config that changes the trajectory, move
the old run aside (``never``), or insist on a checkpoint (``must``). ``RunDir.begin`` writes
the config once the checkpoint has been restored; until then a refused or failed start leaves
an existing directory byte-for-byte unchanged.
"""
from __future__ import annotations

import os
import time

from bpkit.config import dump_config
from bpkit.train import checkpoint as ckpt
from bpkit.train import resume
from bpkit.train.lock import LOCK_NAME, RunLock
from bpkit.train.writers import MetricsFile, RunDirError, os_failure, write_atomic, write_json

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "summary.json")


class RunDir:
    """The paths of one run directory, its lock, and its metrics file."""

    def __init__(self, path: str, *, main: bool = True):
        self.path = os.path.abspath(path)
        self.main = main
        self.config_path = os.path.join(self.path, "config.yaml")
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        self.summary_path = os.path.join(self.path, "summary.json")
        self.ckpt_dir = os.path.join(self.path, "checkpoints")
        self.lock = RunLock(self.path)
        self.metrics = MetricsFile(self.metrics_path, enabled=main)
        self.changes: list = []         # resumable keys that differ from the stored config
        self.moved_to: str | None = None

    def holds_run(self) -> bool:
        return os.path.isdir(self.path) and any(
            os.path.exists(os.path.join(self.path, f)) for f in RUN_FILES)

    def _create(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunDirError(f"cannot use {self.path} as the run directory: it is a file; "
                              "choose another run.out_dir")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise os_failure("create the run directory", self.path, e) from None
        others = [f for f in os.listdir(self.path) if f != LOCK_NAME]
        if others and not self.holds_run():
            raise RunDirError(f"{self.path} exists and holds other files ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}) but no bpkit run; choose "
                              "another run.out_dir or an empty directory")

    def _move_aside(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, n = f"{self.path}.old-{stamp}", 1
        while os.path.exists(target):
            target, n = f"{self.path}.old-{stamp}-{n}", n + 1
        try:
            os.rename(self.path, target)
        except OSError as e:
            raise os_failure(f"move the old run aside to {target}: cannot rename", self.path,
                             e) from None
        return target

    def open(self, cfg) -> "RunDir":
        """Create or check the directory and lock it, applying ``cfg.run.resume`` (see the
        module docstring). Non-main processes of a multi-host run only check."""
        mode = cfg.run.resume
        if mode == "must" and resume.nothing_to_resume(self.ckpt_dir):
            raise RunDirError(f"run.resume=must, but there is no checkpoint to resume in "
                              f"{self.path}; nothing was changed (run.resume=auto starts a new "
                              "run there)")
        if not self.main:
            if self.holds_run() and mode != "never" and os.path.exists(self.config_path):
                self.changes = resume.check_compatible(self.path, self.config_path, cfg)
            return self
        self._create()
        self.lock.acquire()
        if self.holds_run() and mode == "never":
            self.moved_to = self._move_aside()
            self.lock.release()
            self.lock = RunLock(self.path)
            self._create()
            self.lock.acquire()
        elif self.holds_run() and os.path.exists(self.config_path):
            self.changes = resume.check_compatible(self.path, self.config_path, cfg)
        elif self.holds_run() and not resume.nothing_to_resume(self.ckpt_dir):
            raise RunDirError(f"{self.path} holds checkpoints but no config.yaml, so it cannot "
                              "be checked for resuming; train into another run.out_dir, or "
                              "start over with run.resume=never (the old directory is kept, "
                              "renamed)")
        return self

    def begin(self, cfg, start: int) -> None:
        """The run is accepted: record the config, drop metrics past ``start``, mark the lock
        with this PID."""
        if not self.main:
            return
        self.lock.write_pid()
        write_atomic(self.config_path, dump_config(cfg))
        self.metrics.keep_until(start)

    def save_checkpoint(self, step: int, state, *, keep: int, extra: dict) -> None:
        ckpt.save(self.ckpt_dir, step, state, keep=keep, extra=extra)

    def newest_checkpoint(self) -> str:
        """A sentence naming the checkpoint a stopped run leaves behind (or that none does)."""
        steps = ckpt.complete_steps(self.ckpt_dir)
        if not steps:
            return "No checkpoint exists yet."
        return (f"The newest checkpoint, step {steps[-1]} ({os.path.join(self.ckpt_dir, str(steps[-1]))})"
                ", is kept; the same command resumes from it.")

    def write_summary(self, summary: dict) -> None:
        if self.main:
            write_json(self.summary_path, summary)

    def close(self) -> None:
        self.metrics.close()
        self.lock.release()


def open_run(cfg, *, main: bool = True) -> RunDir:
    return RunDir(cfg.run.out_dir or cfg.out_dir, main=main).open(cfg)
