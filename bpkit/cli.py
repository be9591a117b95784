"""The ``bpkit`` command.

    bpkit train CONFIG [key=value ...]    train (or resume) into runs/<name>
    bpkit eval RUN_DIR                    evaluate a run's latest checkpoint
    bpkit parity CONFIG [key=value ...]   bpkit vs jax.grad vs float64 finite differences
    bpkit plot RUN_DIR                    plots/*.png from metrics.jsonl
    bpkit rules [...]                     the rule coverage table

User mistakes (config keys, types, missing files, data that does not fit the model, a mesh
that does not fit the devices or the batch) exit with
status 2 and a one-line message; so do run-directory and file-system problems (a config that
would change an existing run's trajectory, a run directory locked by another process, an
unwritable or full disk). A non-finite loss or gradient, too many skipped steps, or a parity
mismatch exits 1. SIGINT/SIGTERM/SIGHUP save a checkpoint once training has started and exit
130/143/129 (before that, nothing is written).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys


def _user_error(e: Exception) -> int:
    print(f"bpkit: error: {e}", file=sys.stderr)
    return 2


def _load(config: str, overrides: list[str]):
    from bpkit.config import load_config
    return load_config(config, overrides)


def cmd_train(args) -> int:
    cfg = _load(args.config, args.overrides)
    from bpkit.train import loop
    try:
        loop.train(cfg)
    except (loop.NonFiniteLoss, loop.ParityError) as e:
        print(f"bpkit: {e}", file=sys.stderr)
        return 1
    return 0


def _run_config(run_dir: str):
    from bpkit.config import ConfigError
    path = os.path.join(os.path.abspath(run_dir), "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return _load(path, [])


def cmd_eval(args) -> int:
    import jax

    from bpkit.config import ConfigError
    from bpkit.data import eval_batches
    from bpkit.train import checkpoint as ckpt
    from bpkit.train import loop
    from bpkit.train.step import evaluate
    run_dir = os.path.abspath(args.run_dir)  # read only: no lock (a run may be training)
    cfg = _run_config(run_dir)
    cfg.model.init_from = None
    ds, task, tx, schedule = loop.build(cfg)
    state = loop.init_state(cfg, task, tx)
    step, restored = ckpt.restore_latest(os.path.join(run_dir, "checkpoints"), state,
                                         warn=lambda m: print(m, file=sys.stderr))
    if restored is None:
        raise ConfigError(f"no usable checkpoint in {args.run_dir}/checkpoints")
    _, eval_step = loop.make_steps(cfg, task, tx, schedule)
    res = evaluate(eval_step, jax.device_put(loop.eval_inputs(task, restored)),
                   eval_batches(ds, cfg.data.eval_batch_size, cfg.run.eval_batches or None))
    result = {"step": step, "eval_loss": res.get("loss"),
              "eval_accuracy": res.get("accuracy") if task.kind == "classifier" else None}
    if task.kind == "gan":  # held-out d_loss + g_loss, and how close the samples are
        result["eval_chamfer"] = res.get("chamfer")
    from bpkit.train.writers import dumps
    print(dumps(result))  # strict JSON: a NaN is null, named under "nonfinite"
    return 0


def cmd_parity(args) -> int:
    import jax

    from bpkit.data import train_batch
    from bpkit.train import loop
    cfg = _load(args.config, args.overrides)
    cfg.model.init_from = None  # parity needs only the architecture
    ds, task, tx, schedule = loop.build(cfg)
    state = loop.init_state(cfg, task, tx)
    batch = train_batch(ds, 0, cfg.data.batch_size, cfg.run.seed)
    key = jax.random.fold_in(state.key, 0)
    report = loop.check_step_parity(task, state.params, batch, key,
                                    model_state=state.model_state, fd=not args.no_fd)
    print(f"parity of the train-step loss of {args.config} on one batch of "
          f"{cfg.data.batch_size}:")
    print(report)
    return 0 if report.ok else 1


def cmd_plot(args) -> int:
    from bpkit.config import ConfigError
    from bpkit.train.plots import plot_run
    try:
        paths = plot_run(args.run_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    for p in paths:
        print(p)
    return 0


def cmd_rules(argv: list[str]) -> int:
    from bpkit.check.coverage import rules_command
    return rules_command(argv)


def cmd_bench(argv: list[str]) -> int:
    from bpkit.bench import main as bench_main
    return bench_main(argv)


# Subcommands that parse their own arguments.
PASS_THROUGH = {"rules": cmd_rules, "bench": cmd_bench}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bpkit", description="Backpropagation you can read.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a config into its run directory")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="evaluate a run directory's latest checkpoint")
    e.add_argument("run_dir")
    e.set_defaults(fn=cmd_eval)
    q = sub.add_parser("parity", help="bpkit vs jax.grad vs finite differences on one batch")
    q.add_argument("config")
    q.add_argument("overrides", nargs="*", metavar="key=value")
    q.add_argument("--no-fd", action="store_true", help="skip finite differences")
    q.set_defaults(fn=cmd_parity)
    g = sub.add_parser("plot", help="write plots/*.png for a run directory")
    g.add_argument("run_dir")
    g.set_defaults(fn=cmd_plot)
    sub.add_parser("rules", help="the VJP rule coverage table", add_help=False)
    sub.add_parser("bench", help="bpkit vs jax.grad train-step benchmark (docs/benchmarks.md)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    from bpkit.train import stopping
    old_handlers = stopping.install()  # first: a stop signal is never lost from here on
    stopping.reset()
    try:
        return _main(argv)
    except stopping.Interrupted as e:
        if e.saved_step is None:
            _stderr(f"bpkit: {e.name} received; stopped before training started, nothing new "
                    "was saved" if _is_train(argv) else f"bpkit: {e.name} received; stopped")
            if argv is None:  # the command itself (not a test calling main): see _hard_exit
                _hard_exit(128 + e.signum)
        return 128 + e.signum
    except KeyboardInterrupt:
        _stderr("bpkit: interrupted")
        return 130
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        try:
            sys.stdout.flush()
        except BrokenPipeError:  # `bpkit ... | head`: the reader is gone
            from bpkit.train.writers import silence_stdout
            silence_stdout()


def _hard_exit(status: int) -> None:
    """Exit now, without the interpreter's finalization: a signal that interrupted JAX in the
    middle of tracing or compiling can leave native state that crashes at teardown (exit 139
    instead of 128 + signal). Nothing is pending: no checkpoint was being written, and the
    kernel releases the run directory's lock."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _is_train(argv) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return bool(argv) and argv[0] == "train"


def _stderr(msg: str) -> None:
    try:
        print(msg, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):
        pass


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        return PASS_THROUGH[argv[0]](argv[1:])
    args = _parser().parse_args(argv)
    from bpkit.config import ConfigError
    from bpkit.data import DataError
    from bpkit.sharding import ShardingError
    try:
        return args.fn(args)
    except (ConfigError, DataError, ShardingError) as e:
        return _user_error(e)
    except BrokenPipeError:
        from bpkit.train.writers import silence_stdout
        silence_stdout()
        return 0


if __name__ == "__main__":
    sys.exit(main())
