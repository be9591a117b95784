"""``bpkit compare RUN_DIR... [--metric M ...] [--out FILE]``: runs side by side.

One figure overlays the runs' curves on shared axes (loss, accuracy, learning rate from each
schedule, gradient norm, and the last logged backward signals per layer), one color per run,
train solid and evaluation dashed with markers. Each run is named in the legend by its
``run.name`` and the config keys whose values differ between the runs (computed from the
resolved ``config.yaml`` files), e.g. ``mlp (optimizer.name=sgd)`` against ``mlp
(optimizer.name=adam)``. A table of the runs' summaries, with the differing keys as columns,
is printed and written next to the figure as Markdown (``FILE`` with ``.md``).

    >>> from bpkit.compare import compare
    >>> figure, table = compare(["runs/a", "runs/b"], out="compare.png")
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from bpkit.config import ConfigError
from bpkit.config import flatten
from bpkit.train.history import read_config, read_summary, run_name

# Keys that never change what a run computes: not "differences" between runs.
IGNORED_KEYS = ("run.name", "run.out_dir", "run.progress", "run.keep_checkpoints",
                "run.resume", "data.cache_dir")
METRICS = ("loss", "accuracy", "learning_rate", "grad_norm", "chamfer", "signals")
_TITLES = {"loss": "loss", "accuracy": "accuracy", "learning_rate": "learning rate (schedule)",
           "grad_norm": "gradient norm", "chamfer": "held-out chamfer distance",
           "signals": "||dL/d layer output|| at the last logged step"}


class CompareError(ConfigError):
    """A run directory that cannot be compared (the message says why; exit status 2)."""


def differing_keys(configs: list[dict]) -> list[str]:
    """Dotted config keys whose value is not the same in every config (a key missing from
    one counts as different), sorted, without ``IGNORED_KEYS``."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if k not in IGNORED_KEYS
            and len({repr(f.get(k, "<unset>")) for f in flat}) > 1]


def _value(flat: dict, key: str) -> str:
    v = flat.get(key, "unset")
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def run_labels(run_dirs: list[str], keys: list[str] | None = None, *, max_keys: int = 3
               ) -> list[str]:
    """Legend labels: ``run.name (key=value, ...)`` over the differing keys (those already
    spelled out in the name are left out; at most ``max_keys``); the directory is added where
    names repeat."""
    configs = [read_config(d) for d in run_dirs]
    keys = differing_keys(configs) if keys is None else keys
    names = [run_name(d) for d in run_dirs]
    labels = []
    for d, name, cfg in zip(run_dirs, names, configs):
        flat = flatten(cfg)
        parts = [f"{k}={_value(flat, k)}" for k in keys]
        parts = [p for p in parts if p.split(".")[-1] not in name]
        if len(parts) > max_keys:  # the table has them all
            parts = parts[:max_keys] + [f"+{len(parts) - max_keys} more keys"]
        label = name + (f" ({', '.join(parts)})" if parts else "")
        if names.count(name) > 1 and not parts:
            label += f" [{d}]"
        labels.append(label)
    return labels


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def run_row(run_dir: str) -> dict[str, Any]:
    """The numbers of one run: its summary, or for a run without one (stopped, diverged,
    still running) the last logged values and why it has no summary."""
    from bpkit.train.plots import read_metrics
    s = read_summary(run_dir)
    train, ev = read_metrics(run_dir) if os.path.exists(
        os.path.join(run_dir, "metrics.jsonl")) else ([], [])
    last_eval = ev[-1] if ev else {}
    row = {"steps": None, "train_loss": None, "eval_loss": None, "eval_accuracy": None,
           "wall_seconds": None, "status": "finished"}
    if s is not None:
        row.update({k: s.get(k) for k in ("steps", "train_loss", "eval_loss", "eval_accuracy",
                                          "wall_seconds")})
    else:
        last = train[-1] if train else {}
        row.update(steps=last.get("step"), train_loss=last.get("loss"),
                   eval_loss=last_eval.get("eval_loss"),
                   eval_accuracy=last_eval.get("eval_accuracy"),
                   wall_seconds=last.get("wall_seconds"))
        status = _status_file(run_dir)
        row["status"] = status or (f"no summary (last step {last.get('step', 0)})")
    if "eval_chamfer" in last_eval:
        row["eval_chamfer"] = last_eval["eval_chamfer"]
    return row


def _status_file(run_dir: str) -> str | None:
    """What ``bpkit sweep`` recorded about a run that did not finish (``status.txt``)."""
    path = os.path.join(run_dir, "status.txt")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip() or None
    return None


def summary_table(run_dirs: list[str], keys: list[str] | None = None) -> str:
    """A Markdown table: one row per run, the differing keys as columns, then the summary."""
    configs = [read_config(d) for d in run_dirs]
    keys = differing_keys(configs) if keys is None else keys
    rows = [run_row(d) for d in run_dirs]
    stats = ["steps", "train_loss", "eval_loss", "eval_accuracy", "eval_chamfer",
             "wall_seconds", "status"]
    stats = [k for k in stats if any(r.get(k) is not None for r in rows)]
    header = ["run"] + keys + stats
    body = [[run_name(d)] + [_value(flatten(c), k) for k in keys] + [_fmt(r.get(k))
                                                                     for k in stats]
            for d, c, r in zip(run_dirs, configs, rows)]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(b) for b in body])


def _curves(run_dir: str, metric: str, train: list[dict], ev: list[dict]):
    """``[(steps, values, style)]`` of one run for one metric; style ``train`` or ``eval``."""
    from bpkit.train.plots import series
    if metric == "learning_rate":
        from bpkit.train.history import learning_rate_curves
        last = max((r["step"] for r in train), default=0)
        curves = learning_rate_curves(run_dir, last, train)
        if "learning_rate" in curves:
            steps, rates = curves["learning_rate"]
            return [(steps, rates, "train")]
        return [(*series(train, "learning_rate"), "train")]
    if metric == "chamfer":
        return [(*series(ev, "eval_chamfer"), "eval")]
    keys = {"loss": ("loss", "eval_loss"), "accuracy": ("accuracy", "eval_accuracy"),
            "grad_norm": ("grad_norm", None)}[metric]
    out = [(*series(train, keys[0]), "train")]
    if keys[1]:
        out.append((*series(ev, keys[1]), "eval"))
    return out


def _last_signals(train: list[dict]):
    logged = [r for r in train if r.get("backward_signals")]
    if not logged:
        return None
    sig = {k: v for k, v in logged[-1]["backward_signals"].items() if "/" not in k}
    key = ("activation_grad_norm" if any(v.get("activation_grad_norm") is not None
                                         for v in sig.values()) else "param_grad_norm")
    return list(sig), [v.get(key) for v in sig.values()], logged[-1]["step"]


def plot_compare(run_dirs: list[str], out: str, metrics: list[str] | None = None,
                 labels: list[str] | None = None, title: str | None = None) -> str:
    """Write the overlay figure to ``out`` (one panel per metric some run logged)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bpkit.train.plots import log_axis, read_metrics, step_axis
    metrics = list(metrics or METRICS)
    labels = labels or run_labels(run_dirs)
    logs = [read_metrics(d) for d in run_dirs]
    last = max((r["step"] for tr, ev in logs for r in tr + ev), default=0)
    panels = []
    for m in metrics:
        if m == "signals":
            if any(_last_signals(tr) for tr, _ in logs):
                panels.append(m)
        elif any(len(xs) for (tr, ev), d in zip(logs, run_dirs)
                 for xs, _, _ in _curves(d, m, tr, ev)):
            panels.append(m)
    if not panels:
        raise CompareError("none of the runs logged any of the metrics "
                           f"{', '.join(metrics)}; train them first (bpkit train CONFIG)")
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    ncol_legend = 1 if max(map(len, labels)) > 50 or ncols == 1 else 2
    legend_h = 0.25 * math.ceil((len(labels) + 2) / ncol_legend) + 0.2   # inches
    fig_h = 3.9 * nrows + legend_h + (0.4 if title else 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, fig_h), squeeze=False)
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(run_dirs))]
    for ax, m in zip(axes.flat, panels):
        values = []
        if m == "signals":
            for (tr, _), color in zip(logs, colors):
                got = _last_signals(tr)
                if got:
                    names, norms, _ = got
                    ys = np.array([v if v is not None and v > 0 else np.nan for v in norms])
                    ax.plot(np.arange(len(names)), ys, ".-", color=color)
                    values += [v for v in ys if np.isfinite(v)]
            ax.set_xlabel("layer index (input -> output)")
            log_axis(ax, values, min_ratio=1.0)
        else:
            for (tr, ev), d, color in zip(logs, run_dirs, colors):
                for xs, ys, style in _curves(d, m, tr, ev):
                    if len(xs) == 0:
                        continue
                    if style == "eval" or len(xs) == 1:
                        ax.plot(xs, ys, "o--", ms=4, lw=1, color=color, alpha=0.9)
                    else:
                        ax.plot(xs, ys, "-", lw=1.5, color=color)
                    values += list(ys)
                    _mark_stop(ax, d, xs, ys, color)
            step_axis(ax, last)
            if m in ("loss", "grad_norm", "chamfer"):
                log_axis(ax, values)
            elif m == "learning_rate" and _peaks_apart(ax, values, len(run_dirs)):
                pass  # log scale: rates 20x and more apart would be flat lines at 0
            else:
                log_axis(ax, [], min_ratio=math.inf)
                if m == "learning_rate":
                    ax.set_ylim(bottom=0)
        ax.set_title(_TITLES[m], fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [matplotlib.lines.Line2D([], [], color=c, lw=2, label=lab)
               for c, lab in zip(colors, labels)]
    handles += [matplotlib.lines.Line2D([], [], color="gray", lw=1.5, label="train"),
                matplotlib.lines.Line2D([], [], color="gray", ls="--", marker="o", ms=4,
                                        label="eval (held-out)")]
    fig.legend(handles=handles, loc="lower center", ncol=ncol_legend, fontsize=8.5,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, legend_h / fig_h, 1, 1 - (0.4 / fig_h if title else 0)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _peaks_apart(ax, values, n_runs: int) -> bool:
    """A log axis for learning rates whose peaks differ 20x or more (from 1/100 of the
    smallest peak: warmup starts and decays to 0 run off the bottom)."""
    lines = [np.asarray(line.get_ydata(), float) for line in ax.get_lines()]
    peaks = [y.max() for y in lines if y.size and y.max() > 0]
    if n_runs < 2 or len(peaks) < 2 or max(peaks) / min(peaks) < 20:
        return False
    from bpkit.train.plots import log_axis
    floor = min(peaks) / 100
    log_axis(ax, [v for v in values if v >= floor] + [floor], min_ratio=1.0)
    ax.set_ylim(bottom=floor)
    return True


def _mark_stop(ax, run_dir: str, xs, ys, color) -> None:
    """A cross at the last point of a run that stopped early (diverged, say)."""
    status = _status_file(run_dir)
    if status and len(xs):
        finite = [(x, y) for x, y in zip(xs, ys) if y is not None and np.isfinite(y)]
        if finite:
            ax.plot(*finite[-1], "x", ms=10, mew=2, color=color)


def check_run_dirs(run_dirs: list[str]) -> None:
    from bpkit.train.history import is_run_dir
    bad = [d for d in run_dirs if not is_run_dir(d)]
    if bad:
        raise CompareError(f"{', '.join(bad)}: not a run directory (no config.yaml and no "
                           "metrics.jsonl); pass directories that bpkit train wrote, such as "
                           "runs/mnist1d_mlp")


def compare(run_dirs: list[str], *, out: str = "compare.png", metrics: list[str] | None = None,
            title: str | None = None) -> tuple[str, str]:
    """``(figure path, Markdown table)``; the table is also written to ``out`` with ``.md``."""
    check_run_dirs(run_dirs)
    unknown = [m for m in metrics or [] if m not in METRICS]
    if unknown:
        raise CompareError(f"--metric {unknown[0]!r} is not one of {', '.join(METRICS)}")
    keys = differing_keys([read_config(d) for d in run_dirs])
    figure = plot_compare(run_dirs, out, metrics, run_labels(run_dirs, keys), title)
    table = summary_table(run_dirs, keys)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table + "\n")
    return figure, table
