"""Checkpoints: ``<run dir>/checkpoints/<step>/`` written with orbax-checkpoint.

Each checkpoint holds the state's leaves (``state/``, orbax) and ``meta.json``, written last,
with the step, the leaves' shapes and dtypes and a SHA-256 of each leaf's bytes. It is written
into ``checkpoints/.tmp-<step>/`` and renamed to ``checkpoints/<step>/`` once complete, so a
write that fails (a full disk) or is killed never touches the checkpoints already there.

A checkpoint without ``meta.json`` is partial; one whose arrays fail a checksum (ours, or the
CRC-32C of orbax's storage) is corrupt: ``restore_latest`` skips both (``CheckpointSkipped``),
with a warning, and falls back to the previous checkpoint. One that cannot be read for any
other reason -- permissions, a missing file, an orbax error, arrays that do not fit this run's
state -- raises ``CheckpointUnreadable``: the caller stops rather than start over.

Arrays are stored whole (gathered from their shards), so a checkpoint saved from a run on one
mesh restores onto any other (``mesh.data=4`` -> ``mesh.data=2``): the train loop places the
restored arrays per its own mesh. In a multi-host run every process calls ``save`` (orbax's
save is collective; arrays sharded across hosts are all-gathered first); only process 0
creates, prunes and commits (``meta.json``) the directories.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import warnings

import jax
import numpy as np

from bpkit.train.writers import RunDirError, os_failure

META = "meta.json"
TMP_PREFIX = ".tmp-"


class CheckpointSkipped(ValueError):
    """A partial or corrupt checkpoint: skipped in favour of the previous one."""


class CheckpointUnreadable(RunDirError):
    """A checkpoint that exists but cannot be read for a reason other than a failed checksum
    (the run stops; exit status 2)."""

    def __init__(self, path: str, reason: str):
        super().__init__(
            f"checkpoint {path} exists but cannot be read ({reason}); nothing was changed. Fix "
            "the cause, or move that checkpoint directory away to use the previous one, or "
            "start over with run.resume=never (the old run directory is kept, renamed)")
        self.path = path


def _quiet_orbax():
    for name in ("absl", "orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _ThreadQuietStderr:
    """``sys.stderr`` while orbax runs. When a write or read fails (a full disk, damaged
    bytes), orbax's worker threads print the error again and again, and tensorstore's
    callbacks print "RuntimeError: Event loop is closed" tracebacks as its event loops shut
    down. bpkit reports the failure itself, in one sentence; so output written during the call
    is held back, replayed if the call succeeds and dropped if it fails, and after a failure
    only the main thread's output gets through and absl's log stays silent (both for the rest
    of the process)."""

    def __init__(self, real):
        self.real, self.held, self.failed = real, [], False
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        main = threading.current_thread() is threading.main_thread()
        if self.failed:
            return self.real.write(text) if main else len(text)
        with self._lock:
            self.held.append(text)
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def _orbax_call():
    real = sys.stderr
    if isinstance(real, _ThreadQuietStderr):  # already failed once: keep filtering
        yield
        return
    quiet = sys.stderr = _ThreadQuietStderr(real)
    absl = logging.getLogger("absl")  # its handler may hold the real stderr: silence it too
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    except BaseException:
        quiet.failed = True
        quiet.held.clear()
        raise
    absl.setLevel(level)
    sys.stderr = real
    if quiet.held:
        real.write("".join(quiet.held))


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def checkpoint_steps(ckpt_dir: str) -> list[int]:
    """Steps of the checkpoint directories under ``ckpt_dir`` (complete or not), ascending."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _host(x) -> np.ndarray:
    """The whole array on the host (all-gathered across processes if it spans hosts)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def save(ckpt_dir: str, step: int, state, *, keep: int = 0, extra: dict | None = None) -> str:
    """Write ``state`` as checkpoint ``step``; keep the newest ``keep`` (0: keep all).

    Written into ``.tmp-<step>/`` and renamed into place when complete; on any failure the
    temporary directory is removed and ``RunDirError`` names the path and the cause, with
    the existing checkpoints untouched."""
    import orbax.checkpoint as ocp
    _quiet_orbax()
    main = jax.process_index() == 0
    leaves = [_host(x) for x in jax.tree_util.tree_leaves(state)]
    ckpt_dir = os.path.abspath(ckpt_dir)
    path = os.path.join(ckpt_dir, str(step))
    tmp = os.path.join(ckpt_dir, f"{TMP_PREFIX}{step}")
    try:
        if main:
            _remove_stale_tmp(ckpt_dir)
            os.makedirs(tmp)
        _barrier(f"bpkit_ckpt_mkdir_{step}")
        items = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
        with _orbax_call():
            ocp.PyTreeCheckpointer().save(os.path.join(tmp, "state"), items)  # collective
        if main:
            meta = {"step": int(step), "num_leaves": len(leaves),
                    "shapes": [list(x.shape) for x in leaves],
                    "dtypes": [x.dtype.name for x in leaves],
                    "sha256": [_digest(x) for x in leaves], **(extra or {})}
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(path):  # a partial or corrupt checkpoint of the same step
                trash = os.path.join(ckpt_dir, f"{TMP_PREFIX}old-{step}")
                os.replace(path, trash)
                os.replace(tmp, path)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, path)
    except Exception as e:  # orbax wraps OS errors (a full disk) in its own exceptions
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise os_failure("write checkpoint", tmp, e) from None
        raise RunDirError(f"cannot write checkpoint {tmp}: {_cause(e)}; the previous "
                          "checkpoints are unchanged (free some space or fix the run "
                          "directory, then run the same command to resume)") from None
    if main and keep:
        for old in complete_steps(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, str(old)), ignore_errors=True)
    _barrier(f"bpkit_ckpt_commit_{step}")
    return path


def _remove_stale_tmp(ckpt_dir: str) -> None:
    """Temporary directories of writes that were killed (never renamed into place)."""
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _cause(e: BaseException) -> str:
    """The OS error inside an orbax/tensorstore error ("No space left on device (errno
    28)"), else its first line."""
    m = re.search(r"os_error_code='?(\d+)", str(e))
    if m:
        return f"{os.strerror(int(m.group(1)))} (errno {m.group(1)})"
    return _first_line(e)


def _is_data_loss(e: BaseException) -> bool:
    """Whether orbax/tensorstore failed because stored bytes fail their own checksum."""
    text = str(e)
    return any(w in text for w in ("DATA_LOSS", "CRC-32C", "checksum mismatch"))


def _check_readable(path: str) -> None:
    """Every directory and file of the checkpoint can be opened, else ``CheckpointUnreadable``
    naming the first that cannot (a permission or path problem, not damage)."""
    def fail(e: OSError):
        raise CheckpointUnreadable(path, f"{e.filename}: {e.strerror}")
    for root, _, files in os.walk(path, onerror=fail):
        for name in files:
            try:
                os.close(os.open(os.path.join(root, name), os.O_RDONLY))
            except OSError as e:
                fail(e)


def read_meta(path: str) -> dict:
    """``meta.json`` of the checkpoint at ``path`` (``CheckpointSkipped`` if partial or
    damaged, ``CheckpointUnreadable`` if its files cannot be opened)."""
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise CheckpointSkipped("partial checkpoint (no meta.json)")
    _check_readable(path)
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # meta.json is written atomically
        raise CheckpointSkipped(f"damaged meta.json ({e})") from None


def _orbax_items(path: str):
    import orbax.checkpoint as ocp
    _quiet_orbax()
    try:
        with _orbax_call():
            return ocp.PyTreeCheckpointer().restore(os.path.join(path, "state"))
    except Exception as e:  # noqa: BLE001 -- orbax raises many kinds of errors
        if _is_data_loss(e):
            raise CheckpointSkipped(f"corrupt: {_first_line(e)}") from None
        raise CheckpointUnreadable(path, f"orbax: {_cause(e)}") from None


def restore_leaves(path: str) -> list[np.ndarray]:
    """The checkpoint's arrays in order, checked against meta.json (no template needed).
    Raises ``CheckpointSkipped`` (partial or corrupt) or ``CheckpointUnreadable``."""
    path = os.path.abspath(path)
    meta = read_meta(path)
    items = _orbax_items(path)
    leaves = [np.asarray(items[f"leaf_{i:05d}"]) for i in range(meta["num_leaves"])]
    for i, x in enumerate(leaves):
        if _digest(x) != meta["sha256"][i]:
            raise CheckpointSkipped(f"array {i} does not match its checksum (corrupt)")
    return leaves


def restore(path: str, like):
    """The checkpoint at ``path`` as a pytree shaped like ``like``. Raises
    ``CheckpointSkipped`` if it is partial or corrupt, ``CheckpointUnreadable`` if it cannot be
    read or does not fit ``like``."""
    path = os.path.abspath(path)
    meta = read_meta(path)
    leaves_like, treedef = jax.tree_util.tree_flatten(like)
    if meta["num_leaves"] != len(leaves_like):
        raise CheckpointUnreadable(path, f"it holds {meta['num_leaves']} arrays, this run's "
                                   f"state has {len(leaves_like)}: a different model or "
                                   "optimizer")
    items = _orbax_items(path)
    leaves = []
    for i, ref in enumerate(leaves_like):
        x = np.asarray(items.get(f"leaf_{i:05d}")) if f"leaf_{i:05d}" in items else None
        if x is None:
            raise CheckpointUnreadable(path, f"array {i} is missing")
        if list(x.shape) != list(np.shape(ref)) or x.dtype.name != np.asarray(ref).dtype.name:
            raise CheckpointUnreadable(path, f"array {i} has shape {x.shape} {x.dtype}, this "
                                       f"run expects {np.shape(ref)} {np.asarray(ref).dtype}")
        if _digest(x) != meta["sha256"][i]:
            raise CheckpointSkipped(f"array {i} does not match its checksum (corrupt)")
        leaves.append(x)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def restore_latest(ckpt_dir: str, like, *, warn=None):
    """``(step, state)`` of the newest good checkpoint, or ``(None, None)`` if there is none.

    Partial or corrupt checkpoints are reported through ``warn`` (default: ``warnings.warn``)
    and skipped; ``CheckpointUnreadable`` propagates."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    ckpt_dir = os.path.abspath(ckpt_dir)
    for step in reversed(checkpoint_steps(ckpt_dir)):
        path = os.path.join(ckpt_dir, str(step))
        try:
            return step, restore(path, like)
        except CheckpointSkipped as e:
            warn(f"warning: skipping checkpoint {path}: {e}; using the previous one")
    return None, None


def complete_steps(ckpt_dir: str) -> list[int]:
    """Steps of the checkpoints that have their ``meta.json`` (not verified), ascending."""
    return [s for s in checkpoint_steps(ckpt_dir)
            if os.path.exists(os.path.join(ckpt_dir, str(s), META))]
