"""``plot_run(run_dir)``: ``plots/*.png`` from ``metrics.jsonl`` (matplotlib's non-interactive
Agg backend), drawn so they can be read at a glance and do not mislead:

* loss (a GAN's discriminator and generator losses apart, never their sum), accuracy (only
  with two or more points; a single evaluation is a marked, labelled point), gradient norm,
  learning rate **from the schedule at every step** (not the logging window's mean), a GAN's
  held-out chamfer distance, and ``gradient_flow.png`` and ``layer_health.png`` when backward
  signals were logged;
* ``samples.png`` (a GAN's generated vs real points) and ``fit.png`` (a regression model's
  curve over the data) from the parameters (``bpkit.train.outputs``);
* titles name ``run.name``; steps are integers; log axes carry plain decimal labels
  (0.2, 0.5, 1, 2) with enough ticks to read a value off.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """``(train records, eval records)`` of ``run_dir/metrics.jsonl``."""
    train, ev = [], []
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (is it a run directory?)")
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key in rec.get("nonfinite", []):  # written as null: plotted as a gap
                if rec.get(key, 0) is None:
                    rec[key] = float("nan")
            (ev if rec.get("split") == "eval" else train).append(rec)
    return train, ev


def plain_number(v: float, _pos=None) -> str:
    """A tick label in plain decimals with up to 4 significant digits (0.0005, 0.2, 3, 1500),
    or ``1e-7``-style beyond 1e-4 .. 1e6."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    if 1e-4 <= abs(v) < 1e6:
        return np.format_float_positional(float(f"{v:.4g}"), trim="-")
    mantissa, exp = f"{v:.3g}".split("e") if "e" in f"{v:.3g}" else (f"{v:.3g}", "0")
    return f"{mantissa}e{int(exp)}"


def log_axis(ax, values, *, axis: str = "y", min_ratio: float = 2.5) -> bool:
    """A log scale on ``axis`` when ``values`` (the plotted ones) are positive and span at
    least ``min_ratio``; ticks at 1-2-5 (every integer within a decade, only decades beyond
    four), labelled in plain decimals. Returns whether the axis became logarithmic."""
    import matplotlib.ticker as mt
    v = np.asarray([x for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0 or (v <= 0).any() or v.max() / v.min() < min_ratio:
        getattr(ax, f"{axis}axis").set_major_formatter(mt.FuncFormatter(plain_number))
        return False
    decades = math.log10(v.max() / v.min())
    subs = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0) if decades < 1.3 else (
        (1.0, 2.0, 5.0) if decades < 4 else (1.0,))
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    a = getattr(ax, f"{axis}axis")
    a.set_major_locator(mt.LogLocator(base=10, subs=subs, numticks=40))
    a.set_major_formatter(mt.FuncFormatter(plain_number))
    a.set_minor_locator(mt.LogLocator(base=10, subs="all", numticks=40))
    a.set_minor_formatter(mt.NullFormatter())
    return True


def step_axis(ax, last_step: int | None = None) -> None:
    """Integer step ticks, from 0."""
    import matplotlib.ticker as mt
    ax.xaxis.set_major_locator(mt.MaxNLocator(integer=True, min_n_ticks=3))
    ax.xaxis.set_major_formatter(mt.FuncFormatter(lambda v, _p: f"{int(round(v)):,}"))
    ax.set_xlim(left=0, right=(last_step * 1.02 if last_step else None))
    ax.set_xlabel("step")


def style_step_title(ax, name: str, what: str) -> None:
    title = f"{name}: {what}"
    ax.set_title(title, fontsize=11 if len(title) < 60 else 9)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` where the records hold a number for it."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def mark_single(ax, xs, ys, color, label) -> None:
    """One point: a marker with its value written beside it (a line needs two)."""
    ax.plot(xs, ys, "o", ms=8, color=color, label=f"{label} (one point)")
    ax.annotate(f"{ys[0]:.4g} at step {xs[0]:,}", (xs[0], ys[0]), textcoords="offset points",
                xytext=(-9, -4), ha="right", va="top", fontsize=9, color=color)


def _draw(ax, xs, ys, label, color, *, eval_style: bool = False) -> bool:
    if not xs:
        return False
    if len(xs) == 1:
        mark_single(ax, xs, ys, color, label)
    elif eval_style:
        ax.plot(xs, ys, "o--", ms=5, color=color, label=label)
    else:
        ax.plot(xs, ys, "-", color=color, label=label)
    return True


def _panel_loss(ax, train, ev, run_dir):
    gan = any("d_loss" in r for r in train)
    keys = ([("d_loss", "discriminator"), ("g_loss", "generator")] if gan
            else [("loss", "")])
    values = []
    for i, (key, who) in enumerate(keys):
        color = f"C{i}"
        xs, ys = series(train, key)
        exs, eys = series(ev, f"eval_{key}")
        _draw(ax, xs, ys, f"{who} train".strip(), color)
        _draw(ax, exs, eys, f"{who} eval (held-out)".strip(), color if gan else "C1",
              eval_style=True)
        values += ys + eys
    if not values:
        return None
    log_axis(ax, values)
    return "loss" if not gan else "losses (discriminator, generator)"


def _panel_accuracy(ax, train, ev, run_dir):
    xs, ys = series(train, "accuracy")
    exs, eys = series(ev, "eval_accuracy")
    if not xs and not exs:
        return None
    _draw(ax, xs, ys, "train (window mean)", "C0")
    _draw(ax, exs, eys, "eval (held-out)", "C1", eval_style=True)
    log_axis(ax, [], min_ratio=math.inf)  # plain labels
    return "accuracy"


def _panel_learning_rate(ax, train, ev, run_dir):
    from bpkit.train.history import learning_rate_curves
    last = max((r["step"] for r in train), default=0)
    curves = learning_rate_curves(run_dir, last, train)
    if curves:
        names = {"learning_rate": "learning rate", "d_learning_rate": "discriminator"}
        for i, (key, (steps, rates)) in enumerate(curves.items()):
            ax.plot(steps, rates, color=f"C{i}", lw=1.6,
                    label=names[key] + " (schedule, every step)")
    else:  # no config: what was logged, which is each window's mean
        xs, ys = series(train, "learning_rate")
        if not xs:
            return None
        _draw(ax, xs, ys, "logged (mean over each logging window)", "C0")
    log_axis(ax, [], min_ratio=math.inf)  # linear from 0: warmup and decay read as they are
    ax.set_ylim(bottom=0)
    return "learning rate"


def _panel_grad_norm(ax, train, ev, run_dir):
    xs, ys = series(train, "grad_norm")
    if not xs:
        return None
    _draw(ax, xs, ys, "||gradient|| (window mean)", "C0")
    log_axis(ax, ys)
    return "gradient norm"


def _panel_chamfer(ax, train, ev, run_dir):
    xs, ys = series(ev, "eval_chamfer")
    if not xs:
        return None
    _draw(ax, xs, ys, "held-out chamfer distance", "C2", eval_style=True)
    log_axis(ax, ys)
    return "sample distance (generated vs real, lower is better)"


PANELS = {"loss": _panel_loss, "accuracy": _panel_accuracy,
          "learning_rate": _panel_learning_rate, "grad_norm": _panel_grad_norm,
          "chamfer": _panel_chamfer}


def plot_run(run_dir: str, *, trained=None, outputs: bool = True) -> list[str]:
    """Write the plots; returns their paths. ``outputs``: also ``samples.png``/``fit.png``
    from ``trained`` (a ``bpkit.train.outputs.Trained``) or the latest checkpoint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bpkit.train.history import run_name
    train, ev = read_metrics(run_dir)
    title = run_name(run_dir)
    last = max((r["step"] for r in train + ev), default=0)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, panel in PANELS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4))
        what = panel(ax, train, ev, run_dir)
        if what is None:
            plt.close(fig)
            continue
        step_axis(ax, last)
        ax.set_ylabel(what if len(what) < 30 else name.replace("_", " "))
        style_step_title(ax, title, what)
        ax.grid(alpha=0.3, which="major")
        ax.grid(alpha=0.1, which="minor")
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    for plot in (plot_gradient_flow, plot_layer_health):
        path = plot(run_dir, train)
        if path:
            written.append(path)
    if outputs:
        from bpkit.train.outputs import plot_outputs
        written += plot_outputs(run_dir, trained, title=title)
    return written


def plot_gradient_flow(run_dir: str, train: list[dict] | None = None, *,
                       nested: bool = False, max_curves: int = 12) -> str | None:
    """``plots/gradient_flow.png``: per-layer backward-signal norms against depth (layer index,
    input side on the left), one curve per logged step colored by step (at most
    ``max_curves``, evenly spaced), log-scale y; ``||dL/d output||`` solid, ``||dL/d params||``
    dashed. Only top-level layers unless ``nested``. ``None`` if nothing was logged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if train is None:
        train, _ = read_metrics(run_dir)
    logged = [r for r in train if r.get("backward_signals")]
    if not logged:
        return None
    if len(logged) > max_curves:
        idx = np.unique(np.linspace(0, len(logged) - 1, max_curves).round().astype(int))
        logged = [logged[i] for i in idx]
    layers = [name for name in logged[-1]["backward_signals"] if nested or "/" not in name]
    steps = [r["step"] for r in logged]
    cmap = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(vmin=min(steps), vmax=max(max(steps), min(steps) + 1))
    fig, ax = plt.subplots(figsize=(min(10.0, max(6.5, 0.2 * len(layers) + 3)), 4.5))
    xs = np.arange(len(layers))

    def series(rec, key):
        vals = [rec["backward_signals"].get(name, {}).get(key) for name in layers]
        return np.array([v if v is not None and v > 0 else np.nan for v in vals], float)

    any_act, drawn = False, []
    for rec in logged:
        color = cmap(norm(rec["step"]))
        act, par = series(rec, "activation_grad_norm"), series(rec, "param_grad_norm")
        if np.isfinite(act).any():
            any_act = True
            ax.plot(xs, act, "-", marker=".", color=color, lw=1.4)
        if np.isfinite(par).any():
            ok = np.isfinite(par)
            ax.plot(xs[ok], par[ok], "--", marker="x", ms=3, color=color, lw=1.0)
        drawn += [v for v in np.concatenate([act, par]) if np.isfinite(v)]
    if not log_axis(ax, drawn, min_ratio=1.0):
        ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(layers, rotation=70, ha="right", fontsize=7)
    ax.set_xlabel("layer (input -> output)")
    ax.set_ylabel("gradient norm")
    handles = [matplotlib.lines.Line2D([], [], color="k", ls="--", marker="x", ms=3,
                                       label="||dL/d params||")]
    if any_act:
        handles.insert(0, matplotlib.lines.Line2D([], [], color="k", ls="-", marker=".",
                                                  label="||dL/d layer output||"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=norm)
    fig.colorbar(sm, ax=ax, label="step")
    from bpkit.train.history import run_name
    style_step_title(ax, run_name(run_dir), "gradient flow")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gradient_flow.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# (metric key, panel title, log y axis) of layer_health.png
HEALTH_PANELS = (("update_ratio_log10", "log10 ||update|| / ||params||", False),
                 ("dead_fraction", "dead units (fraction)", False),
                 ("param_norm", "||params||", True),
                 ("act_std", "activation std (mean: dotted)", False))


def plot_layer_health(run_dir: str, train: list[dict] | None = None, *,
                      update_ratio_band: tuple[float, float] | None = None,
                      max_curves: int = 12) -> str | None:
    """``plots/layer_health.png``: per-layer health against depth (top-level layers, input side
    on the left), one curve per logged step colored by step, as ``gradient_flow.png``: the
    update-to-parameter ratio (log10, with the warning band of the run's config shaded), the
    fraction of dead units, the parameter norm and the activations' standard deviation (and
    mean, dotted). ``None`` if the run logged no layer health."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if train is None:
        train, _ = read_metrics(run_dir)
    logged = [r for r in train if r.get("backward_signals")
              and any("param_norm" in v for v in r["backward_signals"].values())]
    if not logged:
        return None
    if len(logged) > max_curves:
        idx = np.unique(np.linspace(0, len(logged) - 1, max_curves).round().astype(int))
        logged = [logged[i] for i in idx]
    if update_ratio_band is None:
        update_ratio_band = _band_from_config(run_dir)
    layers = [name for name in logged[-1]["backward_signals"] if "/" not in name]
    steps = [r["step"] for r in logged]
    cmap = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(vmin=min(steps), vmax=max(max(steps), min(steps) + 1))
    xs = np.arange(len(layers))
    width = min(12.0, max(8.0, 0.25 * len(layers) + 5))
    fig, axes = plt.subplots(2, 2, figsize=(width, 7), sharex=True)

    def series(rec, key):
        vals = [rec["backward_signals"].get(name, {}).get(key) for name in layers]
        return np.array([np.nan if v is None else v for v in vals], float)

    for ax, (key, title, logy) in zip(axes.flat, HEALTH_PANELS):
        plotted = []
        for rec in logged:
            color = cmap(norm(rec["step"]))
            ys = series(rec, key)
            ok = np.isfinite(ys)
            if ok.any():
                ax.plot(xs[ok], ys[ok], "-", marker=".", color=color, lw=1.3)
                plotted += list(ys[ok])
            if key == "act_std":
                means = series(rec, "act_mean")
                ok = np.isfinite(means)
                ax.plot(xs[ok], means[ok], ":", color=color, lw=1.0)
        if key == "update_ratio_log10" and update_ratio_band is not None:
            lo, hi = (np.log10(b) for b in update_ratio_band)
            ax.axhspan(lo, hi, color="tab:green", alpha=0.08, lw=0)
            ax.axhline(-3, color="tab:green", ls="--", lw=0.8)
        if key == "dead_fraction":
            ax.set_ylim(-0.03, 1.03)
        if logy:
            log_axis(ax, plotted, min_ratio=1.0)  # plain decimal labels, as everywhere
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[1]:
        ax.set_xticks(xs)
        ax.set_xticklabels(layers, rotation=70, ha="right", fontsize=7)
        ax.set_xlabel("layer (input -> output)")
    sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=norm)
    fig.colorbar(sm, ax=axes, label="step", fraction=0.03)
    from bpkit.train.history import run_name
    fig.suptitle(f"{run_name(run_dir)}: layer health")
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "layer_health.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _band_from_config(run_dir: str) -> tuple[float, float] | None:
    """``(diagnostics.update_ratio_min, _max)`` of the run's config.yaml, if readable."""
    try:
        import yaml
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            d = (yaml.safe_load(f) or {}).get("diagnostics", {})
        return float(d["update_ratio_min"]), float(d["update_ratio_max"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
