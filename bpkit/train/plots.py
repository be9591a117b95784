"""``plot_run(run_dir)``: ``plots/*.png`` from ``metrics.jsonl`` (loss, accuracy, learning rate,
gradient norm, and ``gradient_flow.png`` when the run logged backward signals), with
matplotlib's non-interactive Agg backend."""
from __future__ import annotations

import json
import os


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


def plot_run(run_dir: str) -> list[str]:
    """Write the plots; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, ev = read_metrics(run_dir)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    panels = [("loss", "loss", "eval_loss", True), ("accuracy", "accuracy", "eval_accuracy", False),
              ("learning_rate", "learning_rate", None, False),
              ("grad_norm", "grad_norm", None, True)]
    for name, key, eval_key, logy in panels:
        xs = [r["step"] for r in train if key in r]
        exs = [r["step"] for r in ev if eval_key and eval_key in r]
        if not xs and not exs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        if xs:
            ax.plot(xs, [r[key] for r in train if key in r], label="train")
        if exs:
            ax.plot(exs, [r[eval_key] for r in ev if eval_key in r], "o-", label="eval")
        if name == "loss" and any("d_loss" in r for r in train):
            ax.plot(xs, [r["d_loss"] for r in train], label="discriminator")
            ax.plot(xs, [r["g_loss"] for r in train], label="generator")
        ax.set_xlabel("step")
        ax.set_ylabel(name.replace("_", " "))
        if logy and all(r.get(key, 1) > 0 for r in train):
            ax.set_yscale("log")
        ax.set_title(f"{os.path.basename(os.path.normpath(run_dir))}: {name.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    path = plot_gradient_flow(run_dir, train)
    if path:
        written.append(path)
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

    any_act = False
    for rec in logged:
        color = cmap(norm(rec["step"]))
        act, par = series(rec, "activation_grad_norm"), series(rec, "param_grad_norm")
        if np.isfinite(act).any():
            any_act = True
            ax.plot(xs, act, "-", marker=".", color=color, lw=1.4)
        if np.isfinite(par).any():
            ok = np.isfinite(par)
            ax.plot(xs[ok], par[ok], "--", marker="x", ms=3, color=color, lw=1.0)
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
    ax.set_title(f"{os.path.basename(os.path.normpath(run_dir))}: gradient flow")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gradient_flow.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
