"""``bpkit sweep CONFIG key=v1,v2,... [key2=...] [key=value ...] [--out DIR]``: a grid of runs.

Every override whose value lists several values (split at commas outside brackets, so
``model.args.hidden=[64],[64,64]`` is two values and ``model.args.hidden=[64,64]`` one) is an
axis of the grid; the others apply to every run. Each combination trains, one after another,
into ``DIR/<key=value,...>`` with ``run.name`` ``<config's run.name>-<key=value,...>``, and
then ``DIR/compare.png`` and ``DIR/compare.md`` (``bpkit compare`` of the runs) are written.

Every combination's config is checked before the first run starts. Running the same command
again resumes: finished runs are kept, an interrupted one resumes from its checkpoint, and a
run that stopped on a non-finite loss (a learning rate too large, say) is recorded in its
``status.txt`` as diverged and is not retried.
"""
from __future__ import annotations

import itertools
import os
import sys
from typing import Callable

from bpkit.config import ConfigError


def split_values(text: str) -> list[str]:
    """``"0.1,[64,64],x"`` -> ``["0.1", "[64,64]", "x"]``: commas inside brackets or braces
    belong to the value."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def parse_overrides(overrides: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """``(axes, fixed)``: ``[(key, [values])]`` for the overrides with several values, and
    the plain ``key=value`` overrides."""
    axes, fixed = [], []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"sweep: {o!r} is not key=value or key=v1,v2,...; write for "
                              "example optimizer.learning_rate=0.01,0.1")
        key, value = o.split("=", 1)
        values = split_values(value)
        if len(values) > 1:
            if any(not v for v in values):
                raise ConfigError(f"sweep: {o!r} has an empty value; list the values "
                                  "separated by single commas, such as "
                                  f"{key}=0.01,0.1")
            if any(k == key for k, _ in axes):
                raise ConfigError(f"sweep: {key} is swept twice; give all its values once, "
                                  f"such as {key}={','.join(values)}")
            axes.append((key, values))
        else:
            fixed.append(o)
    if not axes:
        raise ConfigError("sweep: no key has several values; sweep one with key=v1,v2,... "
                          "(for example optimizer.name=sgd,adam)")
    return axes, fixed


def slug(assignment: list[tuple[str, str]]) -> str:
    """The directory and run-name suffix of one combination: ``optimizer.name=sgd``, or
    ``optimizer.learning_rate=0.1,optimizer.name=adam`` for two axes (no ``/``)."""
    return ",".join(f"{k}={v}" for k, v in assignment).replace("/", "_").replace(" ", "")


def default_dir(config: str, axes) -> str:
    stem = os.path.splitext(os.path.basename(config))[0]
    return os.path.join("runs", f"sweep_{stem}_" + "_".join(k.split(".")[-1] for k, _ in axes))


def plan(config: str, overrides: list[str], out: str | None = None):
    """``(sweep directory, [(run directory, Config)])``: every combination's config, loaded
    and checked (all problems of all combinations raised at once)."""
    from bpkit.config import load_config
    axes, fixed = parse_overrides(overrides)
    base = load_config(config, fixed)
    sweep_dir = os.path.abspath(out or default_dir(config, axes))
    runs, problems = [], []
    for values in itertools.product(*[vals for _, vals in axes]):
        assignment = [(k, v) for (k, _), v in zip(axes, values)]
        name = slug(assignment)
        run_dir = os.path.join(sweep_dir, name)
        try:
            cfg = load_config(config, fixed + [f"{k}={v}" for k, v in assignment] + [
                f"run.name={base.run.name}-{name}", f"run.out_dir={run_dir}"])
        except ConfigError as e:
            problems += [f"{name}: {p}" for p in e.problems]
            continue
        runs.append((run_dir, cfg))
    if problems:
        raise ConfigError(f"sweep: {len(problems)} problem(s); fix them and run again:\n"
                          + "\n".join(f"  - {p}" for p in problems), problems)
    return sweep_dir, runs


def finished(run_dir: str, cfg) -> str | None:
    """Why a run need not train again (``None``: it must train or resume)."""
    from bpkit.train.history import read_summary
    status = os.path.join(run_dir, "status.txt")
    if os.path.isfile(status):
        with open(status) as f:
            return f.read().strip()
    summary = read_summary(run_dir)
    if summary is not None and summary.get("steps") == cfg.run.steps:
        return "finished"
    return None


def sweep(config: str, overrides: list[str], out: str | None = None, *,
          echo: Callable[[str], None] = print, train: Callable | None = None):
    """Train every combination (see the module docstring); returns ``(sweep directory, run
    directories, figure path, Markdown table)``."""
    from bpkit.compare import compare
    from bpkit.train import loop
    train = train or loop.train
    sweep_dir, runs = plan(config, overrides, out)
    os.makedirs(sweep_dir, exist_ok=True)
    echo(f"bpkit sweep: {len(runs)} runs of {config} -> {sweep_dir}")
    for i, (run_dir, cfg) in enumerate(runs, 1):
        why = finished(run_dir, cfg)
        if why:
            echo(f"[{i}/{len(runs)}] {os.path.basename(run_dir)}: {why}; kept")
            continue
        echo(f"[{i}/{len(runs)}] {os.path.basename(run_dir)}")
        try:
            train(cfg)
        except loop.NonFiniteLoss as e:
            with open(os.path.join(run_dir, "status.txt"), "w") as f:
                f.write(f"diverged: {str(e).split(';')[0]}\n")
            echo(f"[{i}/{len(runs)}] {os.path.basename(run_dir)} diverged: {e}")
    run_dirs = [d for d, _ in runs]
    axes, _ = parse_overrides(overrides)
    title = f"{os.path.basename(config)}: " + ", ".join(
        f"{k} = {' / '.join(v)}" for k, v in axes)
    figure, table = compare(run_dirs, out=os.path.join(sweep_dir, "compare.png"), title=title)
    return sweep_dir, run_dirs, figure, table


def sweep_command(args) -> int:
    """``bpkit sweep``: exit 0 when every run finished or diverged (a diverged run is a
    result), 1 on a parity mismatch; the CLI maps config mistakes to 2."""
    from bpkit.host_memory import reuse_host_memory
    from bpkit.train import loop
    _, runs = plan(args.config, args.overrides, args.out)  # config mistakes: reported now
    if all(cfg.run.host_memory == "reuse" for _, cfg in runs):
        reuse_host_memory(quiet=True)  # before the first run starts JAX's backend
    try:
        sweep_dir, _, figure, table = sweep(args.config, args.overrides, args.out)
    except loop.ParityError as e:
        print(f"bpkit: {e}", file=sys.stderr)
        return 1
    print(table)
    print(f"\nfigure: {figure}\ntable:  {os.path.splitext(figure)[0]}.md")
    return 0
