"""Writing the run directory: strict JSON, atomic files, ``metrics.jsonl``, and the console.

* JSON never holds a bare ``NaN``/``Infinity`` (not JSON): a non-finite number is written as
  ``null`` and its key listed under ``"nonfinite"`` (``{"loss": null, "nonfinite": ["loss"]}``).
* ``config.yaml``, ``summary.json`` and a truncated ``metrics.jsonl`` are written to a
  temporary file and renamed over the old one, so a kill or a full disk leaves the old file.
* A file-system failure (full disk, read-only directory, a path under a regular file) is a
  ``RunDirError``: one sentence naming the path and the OS error; the CLI exits with status 2.
* ``Console`` prints progress to stdout and warnings to stderr; once stdout is closed
  (``bpkit train ... | head``) it stops printing and training goes on.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable

from bpkit.config import ConfigError


class RunDirError(ConfigError):
    """The run directory (or another path bpkit writes, such as the data cache) cannot be
    created, locked, read or written, or holds a run this command must not touch."""


def os_failure(action: str, path: str, e: OSError) -> RunDirError:
    """``cannot <action> <path>: <OS error>`` with what to do."""
    reason = e.strerror or str(e)
    hint = {28: "free some space or choose another run.out_dir",
            13: "fix the permissions or choose another run.out_dir",
            30: "choose a writable run.out_dir",
            20: "a parent of it is a regular file; choose another run.out_dir"}.get(
        e.errno, "fix the path or choose another run.out_dir")
    return RunDirError(f"cannot {action} {path}: {reason} (errno {e.errno}); {hint}")


# ----------------------------------------------------------------------------- strict JSON

def _clean(value, key: str, bad: list[str]):
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(key)
        return None
    if isinstance(value, dict):
        return {k: _clean(v, f"{key}.{k}" if key else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, f"{key}[{i}]", bad) for i, v in enumerate(value)]
    return value


def finite_record(rec: dict) -> dict:
    """``rec`` with every non-finite float replaced by ``None`` and, if there were any, their
    keys (dotted for nested ones) under ``"nonfinite"``."""
    bad: list[str] = []
    out = _clean(rec, "", bad)
    if bad:
        out["nonfinite"] = bad
    return out


def dumps(rec: dict, **kw) -> str:
    """Strict JSON of ``finite_record(rec)`` (raises rather than write ``NaN``)."""
    return json.dumps(finite_record(rec), allow_nan=False, **kw)


# ----------------------------------------------------------------------------- files

def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: the old file stays
    whole if this fails (``RunDirError``)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise os_failure("write", path, e) from None


def write_json(path: str, rec: dict) -> None:
    write_atomic(path, dumps(rec, indent=2) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file, skipping a last line cut short by a kill."""
    if not os.path.exists(path):
        return []
    recs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return recs


class MetricsFile:
    """``metrics.jsonl``, appended one strict-JSON record per line (``enabled=False``: a
    non-main process of a multi-host run, which writes nothing)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled, self._f = path, enabled, None
        self.listeners: list[Callable[[dict], Any]] = []  # each record also goes to these

    def keep_until(self, step: int) -> None:
        """Drop the records after ``step`` (a resumed run rewrites them); ``step=0`` drops
        all. Atomic: the old file stays whole if this fails."""
        if not self.enabled:
            return
        if step == 0:
            if os.path.exists(self.path):
                try:
                    os.remove(self.path)
                except OSError as e:
                    raise os_failure("remove", self.path, e) from None
            return
        keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        write_atomic(self.path, "".join(dumps(r) + "\n" for r in keep))

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        try:
            if self._f is None:
                self._f = open(self.path, "a", encoding="utf-8")
            self._f.write(dumps(rec) + "\n")
            self._f.flush()
        except OSError as e:
            raise os_failure("write", self.path, e) from None
        for listener in self.listeners:  # TensorBoard (train/views.py)
            listener(rec)

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass  # the error was reported by the write that failed
            self._f = None


def last_logged(path: str) -> tuple[dict, dict]:
    """``(last train record, last eval record without the "eval_" prefixes)`` of a
    ``metrics.jsonl`` (for a run that is already complete)."""
    train, ev = {}, {}
    for rec in read_jsonl(path):
        if rec.get("split") == "eval":
            ev = {k[5:]: v for k, v in rec.items() if k.startswith("eval_")}
        else:
            train = rec
    return train, ev


# ----------------------------------------------------------------------------- console

class Console:
    """``out(msg)``: progress to stdout (or to ``sink`` when given, e.g. a test's list);
    ``warn(msg)``: warnings to stderr. A closed stdout (``| head``) silences ``out`` for the
    rest of the run instead of raising ``BrokenPipeError``. ``enabled=False`` (a non-main
    process of a multi-host run) prints nothing."""

    def __init__(self, sink: Callable[[str], Any] | None = None, *, enabled: bool = True):
        self.sink, self.enabled, self.bar = sink, enabled, None
        self.stdout_open = True

    def out(self, msg: str) -> None:
        if self.stdout_open:
            try:
                self._emit(msg, sys.stdout)
            except BrokenPipeError:
                self.stdout_open = False
                silence_stdout()

    def warn(self, msg: str) -> None:
        try:
            self._emit(msg, sys.stderr)
        except (BrokenPipeError, ValueError):
            pass  # stderr is gone too: nothing left to tell

    def _emit(self, msg: str, stream) -> None:
        """``msg`` to the sink, or above the progress bar, or as a line on ``stream``."""
        if not self.enabled:
            return
        if self.sink is not None:
            self.sink(msg)
        elif self.bar is not None:
            self.bar.write(msg, file=stream)
        else:
            print(msg, file=stream, flush=True)


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's final flush of a closed
    pipe does not print ``BrokenPipeError`` on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
