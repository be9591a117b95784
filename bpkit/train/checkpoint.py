"""Checkpoints: ``<run dir>/checkpoints/<step>/`` written with orbax-checkpoint.

Each checkpoint holds the state's leaves (``state/``, orbax) and ``meta.json``, written last,
with the step, the leaves' shapes and dtypes and a SHA-256 of each leaf's bytes. A checkpoint
without ``meta.json`` is partial (the process died while writing it); one whose leaves do not
match their checksums is corrupt. ``restore_latest`` skips both, with a warning, and falls back
to the previous checkpoint.

Arrays are stored whole (gathered from their shards), so a checkpoint saved from a run on one
mesh restores onto any other (``mesh.data=4`` -> ``mesh.data=2``): the train loop places the
restored arrays per its own mesh. In a multi-host run every process calls ``save`` (orbax's
save is collective; arrays sharded across hosts are all-gathered first); only process 0
creates, prunes and commits (``meta.json``) the directories.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings

import jax
import numpy as np

META = "meta.json"


def _quiet_orbax():
    for name in ("absl", "orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
    """Write ``state`` as checkpoint ``step``; keep the newest ``keep`` (0: keep all)."""
    import orbax.checkpoint as ocp
    _quiet_orbax()
    main = jax.process_index() == 0
    leaves = [_host(x) for x in jax.tree_util.tree_leaves(state)]
    path = os.path.abspath(os.path.join(ckpt_dir, str(step)))
    if main:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(path)
    _barrier(f"bpkit_ckpt_mkdir_{step}")
    items = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
    ocp.PyTreeCheckpointer().save(os.path.join(path, "state"), items)  # collective
    if not main:
        _barrier(f"bpkit_ckpt_commit_{step}")
        return path
    meta = {"step": int(step), "num_leaves": len(leaves),
            "shapes": [list(x.shape) for x in leaves], "dtypes": [x.dtype.name for x in leaves],
            "sha256": [_digest(x) for x in leaves], **(extra or {})}
    tmp = os.path.join(path, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, META))
    if keep:
        complete = [s for s in checkpoint_steps(ckpt_dir)
                    if os.path.exists(os.path.join(ckpt_dir, str(s), META))]
        for old in complete[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, str(old)), ignore_errors=True)
    _barrier(f"bpkit_ckpt_commit_{step}")
    return path


def restore_leaves(path: str) -> list[np.ndarray]:
    """The checkpoint's arrays in order, checked against meta.json (no template needed)."""
    import orbax.checkpoint as ocp
    _quiet_orbax()
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    items = ocp.PyTreeCheckpointer().restore(os.path.join(path, "state"))
    leaves = [np.asarray(items[f"leaf_{i:05d}"]) for i in range(meta["num_leaves"])]
    for i, x in enumerate(leaves):
        if _digest(x) != meta["sha256"][i]:
            raise ValueError(f"array {i} does not match its checksum (corrupt)")
    return leaves


def restore(path: str, like):
    """The checkpoint at ``path`` as a pytree shaped like ``like``; raises ``ValueError`` if it
    is partial or corrupt."""
    import orbax.checkpoint as ocp
    _quiet_orbax()
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise ValueError("partial checkpoint (no meta.json)")
    with open(meta_path) as f:
        meta = json.load(f)
    leaves_like, treedef = jax.tree_util.tree_flatten(like)
    if meta["num_leaves"] != len(leaves_like):
        raise ValueError(f"holds {meta['num_leaves']} arrays, the model's state has "
                         f"{len(leaves_like)} (a different model or optimizer?)")
    try:
        items = ocp.PyTreeCheckpointer().restore(os.path.join(path, "state"))
    except Exception as e:  # orbax raises many kinds of errors for damaged files
        raise ValueError(f"unreadable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    leaves = []
    for i, ref in enumerate(leaves_like):
        x = np.asarray(items.get(f"leaf_{i:05d}")) if f"leaf_{i:05d}" in items else None
        if x is None:
            raise ValueError(f"array {i} is missing")
        if list(x.shape) != list(np.shape(ref)) or x.dtype.name != np.asarray(ref).dtype.name:
            raise ValueError(f"array {i} has shape {x.shape} {x.dtype}, expected "
                             f"{np.shape(ref)} {np.asarray(ref).dtype}")
        if _digest(x) != meta["sha256"][i]:
            raise ValueError(f"array {i} does not match its checksum (corrupt)")
        leaves.append(x)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def restore_latest(ckpt_dir: str, like, *, warn=None):
    """``(step, state)`` of the newest good checkpoint, or ``(None, None)`` if there is none.

    Partial or corrupt checkpoints are reported through ``warn`` (default: ``warnings.warn``)
    and skipped."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    for step in reversed(checkpoint_steps(ckpt_dir)):
        path = os.path.join(ckpt_dir, str(step))
        try:
            return step, restore(path, like)
        except ValueError as e:
            warn(f"warning: skipping checkpoint {path}: {e}; using the previous one")
    return None, None
