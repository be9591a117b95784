"""Where a run's loss or gradient turned non-finite: ``bpkit.debug.nonfinite_origin`` on the
update that did, when ``run.on_nonfinite`` fires (``diagnostics.explain_nonfinite``, on by
default).

The train step donates its state and the host reads metrics only every few steps, so the
parameters the bad update started from are gone when the run notices. Batches and randomness
are pure functions of (seed, step), so they are reproduced exactly instead: the newest good
checkpoint before the update (or the initial state), then the same steps again. The report
(primitive, file:line, layer, operand values) goes to the console and, as a record with
``"split": "nonfinite"``, to metrics.jsonl. ``stop`` explains the update that stopped the run;
``skip`` explains the run's first skipped update (once).

In a multi-process run every process replays the whole global batch of each step on its own
first device (no collective: the processes take the decision to explain together, from the
same global metrics, and each reaches the same report; process 0 prints and logs it).
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bpkit.debug import nonfinite_origin
from bpkit.train import checkpoint as ckpt
from bpkit.train.state import TrainState
from bpkit.train.step import with_compute_dtype


class Replay(NamedTuple):
    """What reproducing a state takes: ``fresh_state()`` (the run's initial state, built
    again), ``place(state)`` (onto the run's mesh), the jitted ``step_fn``, ``load(step)``
    (that step's batch, split over the mesh), ``load_whole(step)`` (the whole global batch,
    on the host) and the checkpoint directory. ``done`` collects explained updates."""

    fresh_state: Callable[[], TrainState]
    place: Callable[[TrainState], TrainState]
    step_fn: Callable
    load: Callable[[int], Any]
    load_whole: Callable[[int], Any]
    ckpt_dir: str
    done: set


def _local(replay: Replay) -> Replay:
    """``replay`` on this process's first device with whole batches (multi-process runs)."""
    device = jax.local_devices()[0]
    return replay._replace(place=lambda state: jax.device_put(state, device),
                           load=lambda step: jax.device_put(replay.load_whole(step), device))


def state_before(update: int, replay: Replay) -> tuple[TrainState, int]:
    """``(state, replayed steps)``: the train state just before update ``update`` (1-based,
    the update logged as step ``update``)."""
    like = replay.fresh_state()
    start, state = 0, like
    for s in reversed(ckpt.complete_steps(replay.ckpt_dir)):
        if s > update - 1:
            continue
        try:
            state, start = ckpt.restore(os.path.join(replay.ckpt_dir, str(s)), like), s
            break
        except (ckpt.CheckpointSkipped, ckpt.CheckpointUnreadable):
            continue
    state = replay.place(state)
    for s in range(start, update - 1):
        state, _ = replay.step_fn(state, replay.load(s))
    return state, update - 1 - start


def origin_report(cfg, task, state: TrainState, batch):
    """``nonfinite_origin`` of the loss the train step differentiates, at ``state`` on
    ``batch`` (``None`` when it is finite)."""
    compute = jnp.bfloat16 if cfg.model.compute_dtype == "bfloat16" else None
    loss = with_compute_dtype(task.loss_fn, compute, has_aux=True)
    key = state.step_key()
    if task.stateful:
        def f(params):
            return loss(params, batch, key, state.model_state)[0]
    else:
        def f(params):
            return loss(params, batch, key)[0]
    return nonfinite_origin(f)(state.params)[2]


def explain_update(cfg, task, update: int | None, replay: Replay, con, metrics) -> None:
    """Reproduce update ``update``, then print and log where it turned non-finite."""
    if not cfg.diagnostics.explain_nonfinite or update is None or update in replay.done:
        return
    replay.done.add(update)
    if task.kind == "gan":
        con.warn("note: the origin of the non-finite values is not traced for GAN runs "
                 "(two losses)")
        return
    if jax.process_count() > 1:
        replay = _local(replay)
    state, replayed = state_before(update, replay)
    report = origin_report(cfg, task, state, replay.load(update - 1))
    how = f" (replayed {replayed} steps to reproduce it)" if replayed else ""
    if report is None:
        con.warn(f"note: update {update} is finite when reproduced{how}; the non-finite value "
                 "did not come from its loss or gradient (the optimizer update?)")
        return
    con.warn(f"nonfinite origin: update {update}{how}: {report}")
    metrics.write({"step": update, "split": "nonfinite", "nonfinite_origin": report.to_dict()})
