"""The ``bpkit`` command.

    bpkit train CONFIG [key=value ...]        train (or resume) into runs/<name>
    bpkit eval RUN_DIR...                     evaluate each run's latest checkpoint
    bpkit parity CONFIG [key=value ...]       bpkit vs jax.grad vs float64 finite differences
    bpkit plot RUN_DIR...                     plots/*.png from metrics.jsonl
    bpkit compare RUN_DIR... [--out FILE]     overlay runs' curves; table of their summaries
    bpkit sweep CONFIG key=v1,v2 [...]        train a grid of configs, then compare them
    bpkit report RUN_DIR...                   <run>/report.html, one self-contained page
    bpkit config show CONFIG [key=value ...]  the resolved config, every key commented
    bpkit rules [...]                         the rule coverage table
    bpkit launch --processes N CONFIG [k=v]   N jax.distributed processes on this machine
    bpkit --version

Flags and ``key=value`` overrides may come in any order. User mistakes (config keys, types
and values, model arguments, data files, data that does not fit the model, a mesh that does
not fit the devices or the batch) exit with status 2 and one sentence per problem, all
problems at once; so do run-directory and file-system problems (a config that would change an
existing run's trajectory, a run directory locked by another process, an unwritable or full
disk). A non-finite loss or gradient, too many skipped steps, or a parity mismatch exits 1.
SIGINT/SIGTERM/SIGHUP save a checkpoint once training has started and exit 130/143/129
(before that, nothing is written). The config is read and checked before JAX is imported, so
config mistakes are reported at once.
"""
from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
import textwrap

def _user_error(e: Exception) -> int:
    print(f"bpkit: error: {e}", file=sys.stderr)
    return 2


def _load(config: str, overrides: list[str]):
    from bpkit.config import load_config
    return load_config(config, overrides)


def _host_memory(cfg) -> None:
    """``run.host_memory: reuse``: keep freed host memory (before JAX starts its backend; the
    command always runs first in its process, but a program calling ``main`` may have started
    JAX already: then the run records ``host_memory: system`` in environment.json)."""
    if cfg.run.host_memory == "reuse":
        from bpkit.host_memory import reuse_host_memory
        reuse_host_memory(quiet=True)


def cmd_train(args) -> int:
    cfg = _load(args.config, args.overrides)
    _host_memory(cfg)
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
    _host_memory(_run_config(os.path.abspath(args.run_dirs[0])))
    for run_dir in args.run_dirs:  # one JSON line per run, each with its directory
        _eval_one(os.path.abspath(run_dir))  # read only: no lock (a run may be training)
    return 0


def _eval_one(run_dir: str) -> None:
    cfg = _run_config(run_dir)
    import jax

    from bpkit.config import ConfigError
    from bpkit.data import eval_batches
    from bpkit.train import checkpoint as ckpt
    from bpkit.train import loop
    from bpkit.train.step import evaluate
    cfg.model.init_from = None
    ds, task, tx, schedule = loop.build(cfg)
    state = loop.init_state(cfg, task, tx)
    step, restored = ckpt.restore_latest(os.path.join(run_dir, "checkpoints"), state,
                                         warn=lambda m: print(m, file=sys.stderr))
    if restored is None:
        raise ConfigError(f"no usable checkpoint in {run_dir}/checkpoints")
    _, eval_step = loop.make_steps(cfg, task, tx, schedule)
    res = evaluate(eval_step, jax.device_put(loop.eval_inputs(task, restored)),
                   eval_batches(ds, cfg.data.eval_batch_size, cfg.run.eval_batches or None))
    result = {"run_dir": run_dir, "step": step, "eval_loss": res.get("loss"),
              "eval_accuracy": res.get("accuracy") if task.kind in ("classifier", "lm")
              else None}  # a language model's: next-token accuracy
    if task.kind == "gan":  # held-out d_loss + g_loss, and how close the samples are
        result["eval_chamfer"] = res.get("chamfer")
    if task.kind in ("seq2seq", "diffusion", "policy"):  # bpkit/train/app_tasks.py's metrics
        result.update({f"eval_{k}": v for k, v in res.items() if k != "loss"})
    from bpkit.train.writers import dumps
    print(dumps(result), flush=True)  # strict JSON: a NaN is null, named under "nonfinite"


def cmd_parity(args) -> int:
    cfg = _load(args.config, args.overrides)
    _host_memory(cfg)
    import jax

    from bpkit.data import train_batch
    from bpkit.train import loop
    cfg.model.init_from = None  # parity needs only the architecture
    ds, task, tx, schedule = loop.build(cfg)
    state = loop.init_state(cfg, task, tx)
    batch = train_batch(ds, 0, cfg.data.batch_size, cfg.run.seed)
    key = jax.random.fold_in(state.key, 0)
    report = loop.check_step_parity(task, state.params, batch, key,
                                    model_state=state.model_state, fd=not args.no_fd,
                                    grad_options=cfg.run.grad_options())
    print(f"parity of the train-step loss of {args.config} on one batch of "
          f"{cfg.data.batch_size}:")
    print(report)
    if args.no_fd:
        print("finite differences skipped (--no-fd): only bpkit vs jax.grad was compared")
    return 0 if report.ok else 1


def cmd_config(args) -> int:
    from bpkit.config_show import render
    cfg = _load(args.config, args.overrides)
    sys.stdout.write(render(cfg, args.config))
    return 0


def cmd_plot(args) -> int:
    from bpkit.compare import check_run_dirs
    from bpkit.train.plots import plot_run
    check_run_dirs(args.run_dirs)
    for run_dir in args.run_dirs:
        for p in plot_run(run_dir):
            print(p)
    return 0


def cmd_compare(args) -> int:
    from bpkit.compare import compare
    metrics = [m for group in args.metric or [] for m in group.split(",") if m]
    figure, table = compare(args.run_dirs, out=args.out, metrics=metrics or None)
    print(table)
    print(f"\nfigure: {figure}\ntable:  {os.path.splitext(figure)[0]}.md")
    return 0


def cmd_sweep(args) -> int:
    from bpkit.sweep import sweep_command
    return sweep_command(args)


def cmd_report(args) -> int:
    from bpkit.compare import check_run_dirs
    from bpkit.report import write_report
    check_run_dirs(args.run_dirs)
    for run_dir in args.run_dirs:
        print(write_report(run_dir))
    return 0


def cmd_rules(argv: list[str]) -> int:
    from bpkit.check.coverage import rules_command
    return rules_command(argv)


def cmd_bench(argv: list[str]) -> int:
    from bpkit.bench import main as bench_main
    return bench_main(argv)


# Subcommands that parse their own arguments.
def cmd_launch(argv: list[str]) -> int:
    from bpkit.launch import main as launch_main
    return launch_main(argv)


PASS_THROUGH = {"rules": cmd_rules, "bench": cmd_bench, "launch": cmd_launch}

_OVERRIDES_HELP = ("config overrides, each section.key=value with the value parsed as YAML "
                   "(run.steps=200 optimizer.learning_rate=3e-3 model.args.hidden=[64,64]); "
                   "CONFIG, the overrides and the flags may come in any order")
_EPILOG = """\
Every key of CONFIG, its resolved value and what it means:
  bpkit config show CONFIG [key=value ...]

Exit status: 0 done; 1 a non-finite loss or a parity mismatch; 2 a mistake in the config,
the data or the command line (every problem is listed, one sentence each, with the fix);
130/143 interrupted by SIGINT/SIGTERM (a checkpoint is saved: run the same command to resume).
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Wraps the description (and not the epilog, which is laid out by hand)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=100)

    def add_text(self, text):
        if text is not None and text is not argparse.SUPPRESS and "\n" not in text:
            text = textwrap.fill(text, 95)
        super().add_text(text)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG",
                   help="a YAML config file, such as configs/mnist1d_mlp.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)


def _parser() -> argparse.ArgumentParser:
    from bpkit import __version__
    p = argparse.ArgumentParser(
        prog="bpkit", formatter_class=_Formatter,
        description="Backpropagation you can read: train, evaluate and check models whose "
                    "gradients come from bpkit's hand-written reverse-mode engine.",
        epilog="Run 'bpkit COMMAND -h' for a command's arguments; 'bpkit config show CONFIG' "
               "lists every config key with its meaning.")
    p.add_argument("--version", action="version", version=f"bpkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser(
        "train", help="train (or resume) a config into its run directory",
        formatter_class=_Formatter, epilog=_EPILOG,
        description="Train CONFIG into its run directory (run.out_dir, by default "
                    "runs/<run.name>), resuming from the latest checkpoint there. Every "
                    "problem in the config, the model arguments and the data is reported "
                    "before the first step.")
    _config_args(t)
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="evaluate a run directory's latest checkpoint",
                       formatter_class=_Formatter,
                       description="Evaluate the latest checkpoint of RUN_DIR on the test split "
                                   "of its config; prints one JSON line.")
    e.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories, such as runs/mnist1d_mlp")
    e.set_defaults(fn=cmd_eval)
    q = sub.add_parser("parity", help="bpkit vs jax.grad vs finite differences on one batch",
                       formatter_class=_Formatter, epilog=_EPILOG,
                       description="Compare bpkit's gradient of CONFIG's train-step loss with "
                                   "jax.grad and with float64 central finite differences on "
                                   "the first batch; exit 1 on a mismatch.")
    _config_args(q)
    q.add_argument("--no-fd", action="store_true",
                   help="skip the finite differences (compare with jax.grad only)")
    q.set_defaults(fn=cmd_parity)
    g = sub.add_parser("plot", help="write plots/*.png for run directories",
                       formatter_class=_Formatter)
    g.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories, such as runs/mnist1d_mlp")
    g.set_defaults(fn=cmd_plot)
    _compare_parsers(sub)
    c = sub.add_parser("config", help="show a config resolved, every key commented",
                       formatter_class=_Formatter,
                       description="bpkit config show CONFIG [key=value ...]: print the "
                                   "config with the overrides applied and every default "
                                   "filled in, each key with its meaning, as YAML that "
                                   "trains exactly as CONFIG does.")
    c.add_argument("action", choices=["show"], help="show: print the resolved config")
    _config_args(c)
    c.set_defaults(fn=cmd_config)
    sub.add_parser("rules", help="the VJP rule coverage table", add_help=False)
    sub.add_parser("bench", help="bpkit vs jax.grad train-step benchmark (docs/benchmarks.md)",
                   add_help=False)
    sub.add_parser("launch", help="train with N jax.distributed processes on this machine",
                   add_help=False)
    return p


def _compare_parsers(sub) -> None:
    """``compare``, ``sweep`` and ``report`` (bpkit/compare.py, sweep.py, report.py)."""
    from bpkit.compare import METRICS
    m = sub.add_parser(
        "compare", help="overlay several runs' curves and tabulate their summaries",
        formatter_class=_Formatter,
        description="Overlay the curves of RUN_DIRs on shared axes, each run named by run.name "
                    "and the config keys that differ between the runs, and print a table of "
                    "their summaries with those keys as columns (also written to FILE.md).")
    m.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    m.add_argument("--metric", action="append", metavar="M",
                   help=f"panels to draw, repeated or comma-separated (default all logged: "
                        f"{', '.join(METRICS)})")
    m.add_argument("--out", default="compare.png", metavar="FILE",
                   help="the figure (default compare.png); the table goes to FILE.md")
    m.set_defaults(fn=cmd_compare)
    w = sub.add_parser(
        "sweep", help="train a grid of configs, then compare them",
        formatter_class=_Formatter, epilog=_EPILOG,
        description="Train CONFIG once per combination of the swept values "
                    "(key=v1,v2,... ; several keys make a grid), one after another, each in "
                    "its own run directory under the sweep directory, then write compare.png "
                    "and compare.md there. Plain key=value overrides apply to every run. Run "
                    "the same command again to resume: finished runs are kept, interrupted "
                    "ones resume from their checkpoints.")
    _config_args(w)
    w.add_argument("--out", metavar="DIR", default=None,
                   help="the sweep directory (default runs/sweep_<config name>)")
    w.set_defaults(fn=cmd_sweep)
    r = sub.add_parser("report", help="write a self-contained report.html for run directories",
                       formatter_class=_Formatter,
                       description="Write RUN_DIR/report.html: config, summary, every plot, "
                                   "backward signals, samples, parity and environment in one "
                                   "file that opens without a network.")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    r.set_defaults(fn=cmd_report)


def _parse(argv: list[str]) -> argparse.Namespace:
    """The subcommand's arguments, with flags and positionals in any order (argparse's
    intermixed parsing, per subcommand: it does not support subparsers itself)."""
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = argv[0] if argv else None
    if command in sub.choices:
        args = sub.choices[command].parse_intermixed_args(argv[1:])
        args.command = command
        config, overrides = getattr(args, "config", None), getattr(args, "overrides", [])
        if config and "=" in config and not os.path.exists(config):  # overrides came first
            paths = [o for o in overrides if "=" not in o]
            if len(paths) == 1:
                args.config = paths[0]
                args.overrides = [config] + [o for o in overrides if o != paths[0]]
        return args
    if command is not None and not command.startswith("-"):
        close = difflib.get_close_matches(command, list(sub.choices), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        parser.error(f"unknown command '{command}'{hint}; the commands are "
                     + ", ".join(sub.choices))
    return parser.parse_args(argv)


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
    args = _parse(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # `bpkit ... | head`: the reader is gone
        from bpkit.train.writers import silence_stdout
        silence_stdout()
        return 0
    except Exception as e:
        if isinstance(e, _user_error_types()):
            return _user_error(e)
        raise


def _user_error_types() -> tuple[type, ...]:
    """ConfigError, and DataError/ShardingError if their modules were imported (only they
    raise them; importing them here would import JAX on the fast config-error path)."""
    from bpkit.config import ConfigError
    found: list[type] = [ConfigError]
    for module, name in (("bpkit.data.batching", "DataError"), ("bpkit.sharding",
                                                                 "ShardingError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


if __name__ == "__main__":
    sys.exit(main())
