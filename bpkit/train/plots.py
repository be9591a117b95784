"""``plot_run(run_dir)``: ``plots/*.png`` from ``metrics.jsonl`` (loss, accuracy, learning rate,
gradient norm), with matplotlib's non-interactive Agg backend."""
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
    return written
