"""``train(cfg)``: the loop behind ``bpkit train``, leaving a run directory (see
``bpkit.train.rundir``: config.yaml, metrics.jsonl, summary.json, checkpoints/, plots/).

``mesh.data`` x ``mesh.fsdp`` devices form a ``bpkit.sharding`` mesh: every batch is split over
it, parameters and optimizer state are replicated (``fsdp=1``) or split (``fsdp>1``), and the
jitted step is the same function as on one device (XLA's SPMD partitioner does the rest).
With a ``distributed`` section, ``jax.distributed.initialize`` runs first, each process loads
its own rows of every global batch, and only process 0 writes metrics, plots and the summary.

Batches and randomness are pure functions of (seed, step), and metrics lines past the
restored checkpoint are dropped on resume, so a run killed at any point and restarted with the
same command ends with exactly the losses of an uninterrupted run. What may change on resume,
the lock, and non-finite values: ``resume.py``, ``lock.py``, ``window.py``; signals:
``stopping.py``.
"""
from __future__ import annotations

import os
import sys
import time
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bpkit import sharding, validate
from bpkit.config import Config, ConfigError
from bpkit.data import dataset_from_config, eval_batches, train_batch
from bpkit.nn.low_rank import lora_join, lora_split
from bpkit.paths import resolve_paths
from bpkit.train import checkpoint as ckpt
from bpkit.train import dp, explain, resume, stopping
from bpkit.train.optim import build_optimizer
from bpkit.train.progress import fmt
from bpkit.train.rundir import RunDir
from bpkit.train.signals import SignalReporter, make_signals_fn, signals_to_host
from bpkit.train.state import TrainState
from bpkit.train.step import evaluate, make_eval_step, make_gan_step, make_train_step
from bpkit.train.stopping import Interrupted
from bpkit.train.tasks import Task, build_task
from bpkit.train.views import PARITY_EXAMPLES, RunViews, summary_extras
from bpkit.train.window import MetricsWindow, NonFiniteLoss, TooManySkipped  # noqa: F401
from bpkit.train.writers import Console, last_logged


class ParityError(RuntimeError):
    """bpkit's gradient disagrees with jax.grad on the first batch."""


def setup_distributed(cfg: Config) -> bool:
    """``jax.distributed.initialize`` per ``cfg.distributed`` (before any other JAX call);
    returns whether it ran. All fields null and ``auto: false``: a single process."""
    d = cfg.distributed
    if not d.auto and d.coordinator_address is None:
        return False
    from jax._src import distributed as _dist
    if getattr(_dist.global_state, "client", None) is not None:
        return False  # already initialized in this process
    if d.auto:
        jax.distributed.initialize()
    else:
        sharding.initialize_distributed(sharding.DistributedConfig(
            d.coordinator_address, d.num_processes, d.process_id))
    return True


def build_mesh(cfg: Config):
    """The ``("data", "fsdp")`` mesh of ``cfg.mesh``; ``ShardingError`` if it does not fit."""
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    sharding.check_batch_size(cfg.data.batch_size, mesh)
    return mesh


def place_state(state: TrainState, mesh) -> TrainState:
    """Parameters and optimizer state per ``sharding.shard_state`` (replicated when fsdp=1,
    split along ``"fsdp"`` otherwise); step, model state and key replicated."""
    rep = sharding.replicated(mesh)
    return TrainState(jax.device_put(state.step, rep), sharding.shard_state(state.params, mesh),
                      sharding.shard_state(state.opt_state, mesh),
                      jax.device_put(state.model_state, rep), jax.device_put(state.key, rep))


def _param_count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def build(cfg: Config):
    """``(dataset, task, optimizer(s), schedule(s))`` for ``cfg``."""
    ds = dataset_from_config(cfg.data, cfg.run.seed)
    task = build_task(cfg, ds)
    validate.check_task(cfg, ds, task)  # patterns, batch vs data, memory: all problems at once
    tx, schedule = build_optimizer(cfg.optimizer, cfg.run.steps)
    if task.kind == "gan":
        d_tx, d_schedule = build_optimizer(
            cfg.optimizer, cfg.run.steps,
            learning_rate=cfg.optimizer.d_learning_rate or cfg.optimizer.learning_rate)
        return ds, task, (tx, d_tx), (schedule, d_schedule)
    return ds, task, tx, schedule


def init_state(cfg: Config, task: Task, tx) -> TrainState:
    init_key, run_key = jax.random.split(jax.random.PRNGKey(cfg.run.seed))
    params = task.init(init_key)
    model_state = task.init_state() if task.stateful else {}
    if cfg.model.init_from:  # LoRA adapters (nn.lora) start fresh on the loaded base weights
        base, adapters = lora_split(params)
        base, loaded_state = load_params(cfg.model.init_from, base,
                                         model_state if task.stateful else None)
        params = lora_join(base, adapters)
        model_state = model_state if loaded_state is None else loaded_state
    if task.kind == "gan":
        g_tx, d_tx = tx
        opt_state = {"generator": g_tx.init(params["generator"]),
                     "discriminator": d_tx.init(params["discriminator"])}
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state, {}, run_key)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), model_state, run_key)


def leaf_ranges(state: TrainState) -> dict[str, list[int]]:
    """``{field: [lo, hi]}``: where each ``TrainState`` field's leaves lie among the state's
    flattened leaves (recorded in checkpoint metadata as ``<field>_leaves``)."""
    ranges, lo = {}, 0
    for name in state._fields:
        n = len(jax.tree_util.tree_leaves(getattr(state, name)))
        ranges[f"{name}_leaves"] = [lo, lo + n]
        lo += n
    return ranges


def _matches(meta: dict, field: str, like_leaves) -> bool:
    lo, hi = meta[field]
    return hi - lo == len(like_leaves) and all(
        list(np.shape(x)) == meta["shapes"][lo + i] for i, x in enumerate(like_leaves))


def load_params(run_dir: str, like, like_model_state=None, warn=None):
    """``(params, model_state)`` of ``run_dir``'s latest good checkpoint (for fine-tuning).

    ``model_state`` (BatchNorm's running statistics) is read when ``like_model_state`` is
    given and the checkpoint has one of that structure; else it is ``None`` (start fresh).
    Partial or corrupt checkpoints are skipped; an unreadable one stops (exit 2)."""
    warn = warn or (lambda m: print(m, file=sys.stderr))
    ckpt_dir = os.path.join(os.path.abspath(run_dir), "checkpoints")
    leaves_like, treedef = jax.tree_util.tree_flatten(like)
    for step in reversed(ckpt.checkpoint_steps(ckpt_dir)):
        path = os.path.join(ckpt_dir, str(step))
        try:
            meta = ckpt.read_meta(path)
            if not _matches(meta, "params_leaves", leaves_like):
                raise ConfigError(f"model.init_from: the parameters in {path} do not match "
                                  "this model (use the same model.name and model.args)")
            full = ckpt.restore_leaves(path)
            lo, hi = meta["params_leaves"]
            params = jax.tree_util.tree_unflatten(treedef, full[lo:hi])
            model_state = None
            if like_model_state is not None and "model_state_leaves" in meta:
                state_leaves, state_def = jax.tree_util.tree_flatten(like_model_state)
                if _matches(meta, "model_state_leaves", state_leaves):
                    lo, hi = meta["model_state_leaves"]
                    model_state = jax.tree_util.tree_unflatten(state_def, full[lo:hi])
            return params, model_state
        except ckpt.CheckpointSkipped as e:
            warn(f"warning: skipping checkpoint {path}: {e}; using the previous one")
        except KeyError as e:  # a checkpoint written before leaf ranges were recorded
            raise ckpt.CheckpointUnreadable(path, f"meta.json has no {e}") from None
    raise ConfigError(f"model.init_from: no checkpoint under {ckpt_dir}; train that run first")


def make_steps(cfg: Config, task: Task, tx, schedule) -> tuple[Callable, Callable | None]:
    xla = cfg.run.step_compiler_options()
    if task.kind == "gan":
        g_tx, d_tx = tx
        g_sched, d_sched = schedule
        step = make_gan_step(task.d_loss_fn, task.g_loss_fn, d_tx, g_tx, engine=cfg.run.engine,
                             d_schedule=d_sched, g_schedule=g_sched, compiler_options=xla,
                             **cfg.run.grad_options())
        return step, make_eval_step(task.metric_fn, compiler_options=xla)
    compute = jnp.bfloat16 if cfg.model.compute_dtype == "bfloat16" else None
    step = make_train_step(task.loss_fn, tx, engine=cfg.run.engine, has_aux=True,
                           has_state=task.stateful, schedule=schedule,
                           accumulate_steps=cfg.optimizer.accumulate_steps,
                           compute_dtype=compute,
                           skip_nonfinite=cfg.run.on_nonfinite == "skip",
                           dp=(cfg.optimizer.dp["l2_clip"], cfg.optimizer.dp["noise_multiplier"])
                           if cfg.optimizer.dp else None, compiler_options=xla,
                           **cfg.run.grad_options())
    if task.stateful:  # eval_step((params, model_state), batch): see eval_inputs
        return step, make_eval_step(lambda inputs, b: task.metric_fn(inputs[0], b, inputs[1]),
                                    compiler_options=xla)
    return step, make_eval_step(task.metric_fn, compiler_options=xla)


def eval_inputs(task: Task, state: TrainState):
    """What ``make_steps``' eval step takes first: the parameters, and for a stateful task
    the model state (BatchNorm's running statistics) with them."""
    return (state.params, state.model_state) if task.stateful else state.params


def make_signals(cfg: Config, task: Task, tx=None) -> Callable:
    """The jitted backward-signals function of ``cfg``'s train loss (see train/signals.py):
    ``signals(params, signal_batch(task, batch, state), key, opt_state)``."""
    compute = jnp.bfloat16 if cfg.model.compute_dtype == "bfloat16" else None
    def bundled_loss(params, bundle, key):  # the model state travels with the batch
        batch, model_state = bundle
        return task.loss_fn(params, batch, key, model_state)

    return make_signals_fn(bundled_loss if task.stateful else task.loss_fn,
                           engine=cfg.run.engine, has_aux=True, compute_dtype=compute,
                           with_grads=True,  # the gradient: TensorBoard histograms
                           optimizer=tx, health=cfg.diagnostics.health)


def signal_batch(task: Task, batch, state: TrainState):
    """The batch argument of ``make_signals``' function for ``batch`` at ``state``."""
    return (batch, state.model_state) if task.stateful else batch


def parity_loss(task: Task, key):
    """The scalar the train step differentiates, as ``f(params, batch)``, or for a stateful
    task ``f(params, batch, model_state)`` (not for GANs)."""
    if task.stateful:
        return lambda params, batch, model_state: task.loss_fn(params, batch, key,
                                                               model_state)[0]
    return lambda params, batch: task.loss_fn(params, batch, key)[0]


def check_step_parity(task: Task, params, batch, key, *, model_state=None, fd: bool = True,
                      max_examples: int | None = None, grad_options: dict | None = None):
    """bpkit vs jax.grad (vs float64 finite differences with ``fd``) on the gradient the train
    step takes for ``batch`` (at ``model_state``, for a stateful task). A GAN step takes two:
    the discriminator's loss w.r.t. its parameters and the generator's loss w.r.t. its own;
    both are checked. ``grad_options``: bpkit.grad's settings (the run's ``remat``)."""
    from bpkit.check import ParityReport, check_parity
    check_parity = partial(check_parity, grad_options=grad_options)
    if max_examples is not None:
        batch = jax.tree_util.tree_map(lambda x: x[:max_examples], batch)
    if task.stateful:
        if model_state is None:
            model_state = task.init_state()
        return check_parity(parity_loss(task, key), params, batch, model_state, fd=fd)
    if task.kind != "gan":
        return check_parity(parity_loss(task, key), params, batch, fd=fd)
    kd, kg = jax.random.split(key)
    g, d = params["generator"], params["discriminator"]
    r_d = check_parity(lambda d_, g_, b: task.d_loss_fn(d_, g_, b, kd), d, g, batch, fd=fd)
    r_g = check_parity(lambda g_, d_, b: task.g_loss_fn(g_, d_, b, kg), g, d, batch, fd=fd)
    for leaf in r_d.leaves:
        leaf.path = "discriminator" + leaf.path[len("arg0"):]
    for leaf in r_g.leaves:
        leaf.path = "generator" + leaf.path[len("arg0"):]
    return ParityReport(r_d.leaves + r_g.leaves)


# ----------------------------------------------------------------------------- the loop

def train(cfg: Config, *, out: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.run.out_dir`` (resuming from its checkpoints per
    ``run.resume``); return the summary. ``out`` receives every log and warning line
    (default: log lines to stdout, warnings to stderr)."""
    t_start = time.time()
    resolve_paths(cfg)
    setup_distributed(cfg)
    main = sharding.is_main_process()
    con = Console(out, enabled=main)
    mesh = build_mesh(cfg)
    ds, task, tx, schedule = build(cfg)  # every check before anything is written
    run = RunDir(cfg.run.out_dir, main=main).open(cfg)  # resume check and lock, then writes
    try:
        return _train(cfg, run, con, mesh, t_start, (ds, task, tx, schedule))
    finally:
        run.close()
        if con.bar is not None:
            con.bar.close()


def _train(cfg: Config, run: RunDir, con: Console, mesh, t_start: float, built) -> dict[str, Any]:
    ds, task, tx, schedule = built
    rows = sharding.process_batch_slice(cfg.data.batch_size)
    con.out(f"bpkit train: {cfg.run.name} -> {run.path}")
    if run.moved_to:
        con.out(f"  moved   the previous run to {run.moved_to} (run.resume=never)")
    every = cfg.diagnostics.every
    if every and task.kind == "gan":
        raise ConfigError("diagnostics.every: backward signals are not available for GAN runs "
                          "(two losses); set diagnostics.every=0")
    state = init_state(cfg, task, tx)
    ranges = leaf_ranges(state)  # checkpoint metadata: where params / model state lie
    start, state = resume.restore_or_start(run.ckpt_dir, state, cfg.run.resume, con.warn)
    run.begin(cfg, start)  # the first write into the run directory
    step_fn, eval_step = make_steps(cfg, task, tx, schedule)
    signals_fn = make_signals(cfg, task, tx) if every else None

    devices = [str(d) for d in mesh.devices.flat]
    con.out(f"  model   {cfg.model.name} {task.model_args or ''}: "
            f"{validate.describe_params(cfg, task, state.params)} ({cfg.model.compute_dtype} compute)")
    con.out(f"  data    {ds.describe()}; batch {cfg.data.batch_size}")
    con.out(f"  optim   {cfg.optimizer.name} lr {cfg.optimizer.learning_rate:g} "
            f"({cfg.optimizer.schedule}); {cfg.run.steps} steps")
    con.out(f"  engine  {cfg.run.engine}"
            + (f" (remat {cfg.run.remat})" if cfg.run.remat != "none" else "")
            + f"; devices {', '.join(devices)}"
            + (f" (mesh data={cfg.mesh.data} x fsdp={cfg.mesh.fsdp})" if len(devices) > 1 else "")
            + (f"; {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    if cfg.optimizer.dp:
        con.out(dp.describe(cfg, ds))
    if every:
        con.out(f"  signals backward signals every {every} steps"
                + (" (engine jax: parameter-gradient norms only)"
                   if cfg.run.engine == "jax" else ""))
    if start:
        con.out(f"  resumed from checkpoint at step {start}" + (
            f" (changed: {resume.describe_changes(run.changes)})" if run.changes else ""))

    views = RunViews(cfg, run, con, start)  # progress, TensorBoard, report (train/views.py)
    # whole(step): the global batch of ``step``, all of it, on the host
    whole = partial(train_batch, ds, batch_size=cfg.data.batch_size, seed=cfg.run.seed)
    first = whole(start)
    if cfg.run.check_parity and start < cfg.run.steps:
        report = check_step_parity(task, state.params, first,
                                   jax.random.fold_in(state.key, start),
                                   model_state=state.model_state, fd=False,
                                   max_examples=PARITY_EXAMPLES,
                                   grad_options=cfg.run.grad_options())
        views.parity(report)
        if not sharding.any_process(not report.ok):  # every process takes the same decision
            con.out(f"  parity  first batch: max |bpkit - jax.grad| = {report.max_jax_abs:.2e} "
                    f"over {len(report.leaves)} parameter arrays: OK")
        else:
            con.out(str(report))
            raise ParityError(
                "bpkit's gradient disagrees with jax.grad on the first batch (table above); "
                "train with run.engine=jax and report the mismatch")

    state = place_state(state, mesh)

    def load(step: int):
        """The global batch of ``step``: this process's rows, split over the mesh."""
        host = whole(step)
        if jax.process_count() > 1:
            host = jax.tree_util.tree_map(lambda x: x[rows], host)
        return sharding.global_batch(host, mesh, cfg.data.batch_size)

    replay = explain.Replay(lambda: init_state(cfg, task, tx), lambda s: place_state(s, mesh),
                            step_fn, load, whole, run.ckpt_dir, set())
    window = MetricsWindow(cfg.run.on_nonfinite, cfg.run.max_skipped, run.newest_checkpoint,
                           con.warn)
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    pending_signals: list[tuple[int, Any]] = []
    reporter = SignalReporter(cfg.diagnostics, lambda s: float(schedule(
        (s - 1) // cfg.optimizer.accumulate_steps)) / cfg.optimizer.learning_rate)

    def flush(step: int) -> None:
        """Read the pending device metrics (applying the non-finite policy); log the window."""
        nonlocal last_train
        window_rec = window.take(step)
        explain.explain_update(cfg, task, window.first_skipped, replay, con, run.metrics)
        if window_rec is None:
            return
        del window_rec["step"]
        last_train = window_rec
        rate = views.window(step, window_rec)  # the log line; compilation left out
        rec = {"step": step, "split": "train", "scope": sharding.METRICS_SCOPE, **window_rec,
               "examples_per_second": rate, "wall_seconds": time.time() - t_start}
        if pending_signals:
            s_step, s_dev = pending_signals.pop()
            pending_signals.clear()
            host_signals = signals_to_host(s_dev)
            rec["backward_signals"] = host_signals
            report_signals(s_step, host_signals)
        run.metrics.write(rec)

    def report_signals(step: int, host_signals: dict) -> None:
        for line in reporter.lines(step, host_signals):
            con.warn(line)

    def run_eval(step: int) -> None:
        nonlocal last_eval
        if eval_step is None:
            return
        window.check()  # never evaluate (or log) a state that the policy rejects
        res = evaluate(eval_step, eval_inputs(task, state),
                       eval_batches(ds, cfg.data.eval_batch_size, cfg.run.eval_batches or None))
        last_eval = res
        run.metrics.write({"step": step, "split": "eval", "scope": sharding.METRICS_SCOPE,
                           **{f"eval_{k}": v for k, v in res.items()}})
        con.out(f"eval  {step:>6}/{cfg.run.steps}  loss {fmt(res.get('loss'))}"
                + "".join(f"  {k} {fmt(res[k])}" for k in ("accuracy", "chamfer") if k in res))

    def save(step: int) -> None:
        if step == start and start:
            return  # the checkpoint this run resumed from holds exactly this state
        run.save_checkpoint(step, state, keep=cfg.run.keep_checkpoints,
                            extra={k: ranges[k] for k in ("params_leaves", "model_state_leaves")})

    step = start
    steps_run = 0
    stopping.raise_if_received()  # one dropped by Python before here (e.g. in a GC callback)
    with stopping.deferred():  # from here a stop signal saves a checkpoint first
        try:
            batch = load(start) if start < cfg.run.steps else None
            while step < cfg.run.steps:
                stopping.raise_if_received(step, cfg.run.log_every)  # all processes agree
                if signals_fn is not None and (step == 0 or (step + 1) % every == 0):
                    # Before the step: it donates the state. Same params, batch and key.
                    signals, grads = signals_fn(state.params, signal_batch(task, batch, state),
                                                state.step_key(), state.opt_state)
                    pending_signals.append((step + 1, signals))
                    views.histograms(step + 1, state.params, grads)
                views.stepping(steps_run)
                state, metrics = step_fn(state, batch)
                step += 1
                steps_run += 1
                views.stepped(step, steps_run, step_fn, (state, batch))
                window.add(step, metrics)
                if step < cfg.run.steps:
                    batch = load(step)  # overlaps the device work
                done = step == cfg.run.steps
                if step % cfg.run.log_every == 0 or done or pending_signals:
                    flush(step)
                elif window.due():
                    window.check()
                if (cfg.run.eval_every and step % cfg.run.eval_every == 0) and not done:
                    run_eval(step)
                if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0 and not done:
                    flush(step)
                    save(step)
            flush(step)
            if start < cfg.run.steps:  # (a finished run is left as it is)
                run_eval(step)
            if start < cfg.run.steps or not ckpt.complete_steps(run.ckpt_dir):
                save(step)
        except NonFiniteLoss as e:
            last = window.record()  # the window up to the step that stopped the run
            if last is not None:
                run.metrics.write({"step": last.pop("step"), "split": "train",
                                   "scope": sharding.METRICS_SCOPE, **last})
            views.close()
            explain.explain_update(cfg, task, e.step, replay, con, run.metrics)
            raise
        except Interrupted as e:
            if e.saved_step is None:
                flush(step)
                save(step)
            con.out(f"\n{e.name} received: checkpoint saved at step {step} in {run.ckpt_dir}; "
                    "run the same command again to resume")
            views.close()
            raise Interrupted(e.signum, saved_step=step) from None
        summary = _finish(cfg, run, con, task, state, ds, start, step, steps_run, t_start,
                          last_train, last_eval, window.skipped_total, len(devices), views)
        if stopping.received():  # arrived after the last step: the run is saved and complete
            raise Interrupted(stopping.received(), saved_step=step)
    return summary


def _finish(cfg, run, con, task, state, ds, start, step, steps_run, t_start, last_train,
            last_eval, skipped, n_devices, views) -> dict[str, Any]:
    """summary.json, the closing line, then plots, the language model's sample, TensorBoard
    images and report.html (``views.finish``)."""
    wall = time.time() - t_start
    if not last_train:  # already complete: read the last logged values
        last_train, last_eval = last_logged(run.metrics_path)
    summary = {
        "name": cfg.run.name, "steps": step, "train_loss": last_train.get("loss"),
        "eval_loss": last_eval.get("loss"), **summary_extras(task, last_eval),
        "wall_seconds": wall,
        **views.progress.summary(step),  # throughput after the first step: compilation apart
        "engine": cfg.run.engine, "devices": n_devices,
        "mesh": {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp},
        "processes": jax.process_count(), "scope": sharding.METRICS_SCOPE,
        "parameters": _param_count(state.params),
        "resumed_from": start or None}
    if cfg.run.on_nonfinite == "skip":
        summary["skipped_steps"] = skipped
    summary.update(dp.summary(cfg, step, ds))
    if run.main:
        run.write_summary(summary)
    con.out(f"done: {step} steps in {wall:.1f}s; train loss {fmt(summary['train_loss'])}, "
            f"eval loss {fmt(summary['eval_loss'])}"
            + (f", eval accuracy {fmt(summary['eval_accuracy'])}"
               if summary["eval_accuracy"] is not None else ""))
    sample = views.finish(task, state, ds, step)  # every process (fsdp: a gather)
    if sample is not None:
        con.out("sample:\n" + sample)
    return summary


def sample_text(task: Task, params, ds, cfg: Config) -> str:
    from bpkit.data import decode, encode
    from bpkit.models import generate
    prompt = "def "
    tokens = jnp.asarray(encode(prompt, ds.vocab))[None, :]          # (1, T0)
    out = generate(task.model, params, jax.random.PRNGKey(cfg.run.seed + 1), tokens,
                   cfg.run.sample_length, temperature=0.8)
    out = np.asarray(out).reshape(-1)
    return decode(out, ds.vocab)
