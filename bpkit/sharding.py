"""Scale-out on JAX's own SPMD partitioner: meshes, batch and parameter shardings, multi-host.

bpkit adds no distribution layer of its own. A train step is one jitted program; placing its
inputs with ``NamedSharding`` is all it takes for XLA's GSPMD partitioner to split the work:

* **data parallelism** (``mesh.data = N``): every batch is split along its leading axis over
  the mesh axis ``"data"``; parameters and optimizer state are replicated; the partitioner
  inserts the all-reduce of the gradients.
* **fully sharded data parallelism** (``mesh.fsdp = M``, ZeRO-3 style): in addition, every
  parameter (and so every optimizer-state leaf of the same shape) is split along its largest
  axis divisible by ``M`` over the mesh axis ``"fsdp"``; the batch is split over both axes.
  XLA gathers a parameter where it is used and reduce-scatters its gradient.

Multi-host runs call ``initialize_distributed`` first (``jax.distributed.initialize``); each
process then feeds only its own slice of every global batch (``process_batch_slice``).
What a run reports is computed on the global batch inside the jitted programs, so every
process holds the same values (``METRICS_SCOPE``); ``to_host`` reads them, gathering the
arrays split across processes (fsdp) with ``process_allgather``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class ShardingError(ValueError):
    """A mesh or batch that cannot be laid out on the available devices."""


def make_mesh(data: int = 1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over ``data * fsdp`` devices (the first ones by default)."""
    devices = list(jax.devices() if devices is None else devices)
    for name, n in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if not isinstance(n, int) or n < 1:
            raise ShardingError(f"{name} must be a positive integer, got {n!r}.")
    need = data * fsdp
    if need > len(devices):
        raise ShardingError(
            f"The mesh asks for {need} devices (mesh.data={data} x mesh.fsdp={fsdp}) but only "
            f"{len(devices)} are available ({devices[0].platform}). Lower mesh.data/mesh.fsdp, "
            "or on CPU simulate devices with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N.")
    return Mesh(np.asarray(_spread(devices, need)).reshape(data, fsdp), ("data", "fsdp"))


def _spread(devices: list, need: int) -> list:
    """The first ``need`` devices; in a multi-process job, the same number from every process
    (each process feeds its own rows of every batch, so the mesh must span them all)."""
    procs = sorted({d.process_index for d in devices})
    if len(procs) == 1:
        return devices[:need]
    per, rest = divmod(need, len(procs))
    if rest or per == 0:
        raise ShardingError(
            f"The mesh has {need} devices (mesh.data x mesh.fsdp) but the job has "
            f"{len(procs)} processes, and every process needs the same number of mesh "
            f"devices (each loads its own rows of every batch). Make mesh.data x mesh.fsdp a "
            f"multiple of {len(procs)}, such as {len(devices)} (all devices).")
    mine = [[d for d in devices if d.process_index == p] for p in procs]
    if per > min(len(m) for m in mine):
        raise ShardingError(
            f"The mesh asks for {per} devices per process but a process has only "
            f"{min(len(m) for m in mine)}. Lower mesh.data/mesh.fsdp, or with 'bpkit "
            "launch' raise --local-devices.")
    return [d for m in mine for d in m[:per]]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ShardingError(
            f"The batch size {batch_size} is not divisible by the {n} devices of the mesh "
            f"(mesh.data x mesh.fsdp). Choose a batch size that is a multiple of {n}.")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place every array of ``batch`` with its leading axis split over the mesh."""
    leaves = jax.tree_util.tree_leaves(batch)
    if leaves:
        check_batch_size(int(np.shape(leaves[0])[0]), mesh)
    return jax.device_put(batch, batch_sharding(mesh))


def param_spec(shape: tuple, fsdp: int) -> P:
    """Shard the largest axis divisible by ``fsdp`` over ``"fsdp"``; replicate small leaves."""
    if fsdp == 1 or not shape:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: shape[i])
    spec = [None] * (axis + 1)  # no trailing Nones: the spec XLA gives back (one compile)
    spec[axis] = "fsdp"
    return P(*spec)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """Shardings for parameters or optimizer state: replicated, or fsdp-sharded per leaf."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp)), tree)


def shard_state(tree: Any, mesh: Mesh) -> Any:
    """Place parameters/optimizer state on the mesh (see ``state_shardings``)."""
    return jax.device_put(tree, state_shardings(tree, mesh))


@dataclass(frozen=True)
class DistributedConfig:
    """How to join a multi-host run: all ``None`` means auto-detect under a cluster launcher
    (SLURM, Open MPI, Cloud TPU), which ``jax.distributed.initialize`` does by itself."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def initialize_distributed(cfg: DistributedConfig) -> None:
    """Call ``jax.distributed.initialize`` once, before any other JAX call of the process."""
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=cfg.num_processes, process_id=cfg.process_id)


def global_batch(local_batch: Any, mesh: Mesh, global_batch_size: int) -> Any:
    """This process's rows (``process_batch_slice``) as one global array split over the mesh.

    With one process this is ``shard_batch``; with several, each process passes only its own
    rows and ``jax.make_array_from_process_local_data`` assembles the global batch."""
    check_batch_size(global_batch_size, mesh)
    if jax.process_count() == 1:
        return shard_batch(local_batch, mesh)
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (global_batch_size,) + tuple(np.shape(x)[1:])),
        local_batch)


def process_batch_slice(global_batch_size: int) -> slice:
    """The rows of each global batch that this process loads (its own shard of the data)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise ShardingError(f"The global batch size {global_batch_size} is not divisible by "
                            f"the {n} processes.")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)


# What metrics.jsonl and summary.json say about their values: computed over the whole global
# batch (every process's rows, every device of the mesh) inside one jitted program, so every
# process of a multi-process run holds the same numbers; summary.json's ``processes`` and
# ``devices`` say over how many they were reduced.
METRICS_SCOPE = "global"


def _split_across_processes(x) -> bool:
    return (isinstance(x, jax.Array) and not x.is_fully_addressable
            and not x.is_fully_replicated)


def gather_split(tree: Any) -> Any:
    """``tree`` with every array that is split across processes (an fsdp-sharded parameter
    whose shards live in several processes) replaced by its whole value as NumPy, through
    ``process_allgather``: a collective, so every process calls this at the same point (the
    shardings, and so the gathers, are the same in every process). Other leaves unchanged."""
    from jax.experimental import multihost_utils
    return jax.tree_util.tree_map(
        lambda x: (multihost_utils.process_allgather(x, tiled=True)
                   if _split_across_processes(x) else x),
        tree)


def host_value(x) -> np.ndarray:
    """``x`` as a NumPy array holding its global value, in every process: a replicated array
    is whole in each process; one split across processes is gathered (``gather_split``)."""
    return np.asarray(gather_split(x))


def to_host(tree: Any) -> Any:
    """``host_value`` of every leaf of ``tree`` (a collective where ``gather_split`` is)."""
    return jax.tree_util.tree_map(host_value, tree)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds in any process (one tiny all-gather; every process calls it at
    the same point), so that all of them take the same decision."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def is_main_process() -> bool:
    """Only process 0 writes metrics, plots and summaries (orbax coordinates checkpoints)."""
    return jax.process_index() == 0
