"""TensorBoard event files of a run, in ``<run>/tb/`` (``tensorboard --logdir runs`` shows
every run under ``runs/`` side by side). Written with ``tensorboardX``, which needs neither
TensorFlow nor TensorBoard; without it the run goes on and says once that no events are
written.

What goes in (tags):

    train/loss, train/accuracy, train/grad_norm, ...   each metrics.jsonl train line, at its step
    train/learning_rate (and train/d_learning_rate)    from the schedule, at EVERY step
    train/examples_per_second                          throughput of the logging window
    eval/loss, eval/accuracy, eval/chamfer, ...        each evaluation
    signals/dL_doutput/<layer>, signals/dL_dparams/<layer>   backward signals per layer
    signals/<key>/<layer>                              any other per-layer number logged there
    params/<path>, grads/<path>                        histograms, at the diagnostics cadence
    config                                             the resolved config.yaml, as text
    plots/<name>                                       the run's plots/*.png at the end

A resumed run passes ``purge_step`` (the restored step + 1) so TensorBoard drops whatever a
killed run wrote past its last checkpoint, as ``metrics.jsonl`` is truncated.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable

import numpy as np

# Keys of a metrics.jsonl record that are not scalars to plot.
_SKIP = ("step", "split", "wall_seconds", "nonfinite", "backward_signals")
_SIGNAL_TAGS = {"activation_grad_norm": "signals/dL_doutput",
                "param_grad_norm": "signals/dL_dparams"}


class TensorBoardLog:
    """``record(rec)`` for every metrics.jsonl record; ``histograms``, ``config``, ``images``;
    ``close()`` at the end. ``learning_rate(steps) -> {key: rates}`` (optional) gives the
    schedule at 1-based steps, written at every step instead of the window means."""

    def __init__(self, run_dir: str, *, purge_step: int | None = None,
                 learning_rate: Callable[[np.ndarray], dict] | None = None,
                 warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)):
        self.logdir = os.path.join(run_dir, "tb")
        self.learning_rate = learning_rate
        self._lr_done = (purge_step - 1) if purge_step else 0  # last step whose rate is out
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            warn("warning: tensorboardX is not installed, so no TensorBoard events are written "
                 "(pip install tensorboardX)")
            self.writer = None
            return
        # Event files are named by the second they were opened in: a unique suffix keeps a
        # writer opened within the same second (a quick resume) from truncating the last one.
        self.writer = SummaryWriter(logdir=self.logdir, purge_step=purge_step, flush_secs=30,
                                    filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    # ------------------------------------------------------------------------ scalars
    def record(self, rec: dict) -> None:
        """The scalars of one metrics.jsonl record (a train window or an evaluation)."""
        if self.writer is None:
            return
        step, split = int(rec["step"]), rec.get("split", "train")
        scheduled = self._learning_rates(step) if split == "train" else set()
        for key, value in rec.items():
            if key in _SKIP or key in scheduled or not _is_number(value):
                continue
            name = key[5:] if split == "eval" and key.startswith("eval_") else key
            self.writer.add_scalar(f"{split}/{name}", float(value), step)
        for layer, norms in (rec.get("backward_signals") or {}).items():
            for key, value in norms.items():  # other per-layer numbers under their own key
                if _is_number(value):
                    tag = _SIGNAL_TAGS.get(key, f"signals/{key}")
                    self.writer.add_scalar(f"{tag}/{layer}", float(value), step)

    def _learning_rates(self, step: int) -> set[str]:
        """Write the schedule's rates for the steps not yet written, up to ``step``; the keys
        written (whose window means are then skipped)."""
        if self.learning_rate is None:
            return set()
        if step > self._lr_done:
            steps = np.arange(self._lr_done + 1, step + 1)
            for key, rates in self.learning_rate(steps).items():
                for s, r in zip(steps, np.asarray(rates)):
                    self.writer.add_scalar(f"train/{key}", float(r), int(s))
            self._lr_done = step
        return {"learning_rate", "d_learning_rate"}

    # ------------------------------------------------------------------------ the rest
    def histograms(self, step: int, params, grads=None) -> None:
        """One histogram per parameter array (``params/<path>``) and, when given, per
        gradient array (``grads/<path>``)."""
        if self.writer is None:
            return
        from bpkit.train.optim import param_paths
        import jax
        for prefix, tree in (("params", params), ("grads", grads)):
            if tree is None:
                continue
            leaves = jax.device_get(jax.tree_util.tree_leaves(tree))
            for path, leaf in zip(param_paths(tree), leaves):
                values = np.asarray(leaf, np.float64).reshape(-1)
                values = values[np.isfinite(values)]
                if values.size:
                    self.writer.add_histogram(f"{prefix}/{path}", values, step)

    def config(self, text: str) -> None:
        """The resolved config.yaml as a text entry (indented: Markdown's code block)."""
        if self.writer is not None:
            self.writer.add_text("config", "\n".join("    " + line
                                                     for line in text.splitlines()), 0)

    def images(self, paths: list[str], step: int) -> None:
        """Each PNG as the image ``plots/<file stem>`` at ``step``."""
        if self.writer is None:
            return
        import matplotlib.image as mpimg
        for path in paths:
            img = mpimg.imread(path)                       # (H, W, 3 or 4) floats in [0, 1]
            rgb = (np.clip(img[..., :3], 0, 1) * 255).astype(np.uint8)
            tag = "plots/" + os.path.splitext(os.path.basename(path))[0]
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def for_run(run_dir: str, cfg, *, start: int = 0, **kw) -> TensorBoardLog:
    """The run's writer: the config as text at a fresh start, learning rates from ``cfg``'s
    schedule, and events past ``start`` purged on resume."""
    from bpkit.train.history import learning_rates

    gan = cfg.model.loss == "gan" or cfg.model.name == "gan_2d"

    def rates(steps):
        out = {"learning_rate": learning_rates(cfg, steps)}
        if gan:
            out["d_learning_rate"] = learning_rates(cfg, steps, discriminator=True)
        return out

    log = TensorBoardLog(run_dir, purge_step=start + 1 if start else None, learning_rate=rates,
                         **kw)
    if not start:
        from bpkit.config import dump_config
        log.config(dump_config(cfg))
    return log


def export_run(run_dir: str) -> str:
    """Write ``<run>/tb/`` from an existing run directory's files (metrics.jsonl, config,
    plots): for runs trained before TensorBoard logging, or to rebuild the events. Returns
    the event directory."""
    import shutil

    from bpkit.train.history import run_config
    from bpkit.train.plots import read_metrics
    train, ev = read_metrics(run_dir)
    cfg = run_config(run_dir)
    shutil.rmtree(os.path.join(run_dir, "tb"), ignore_errors=True)
    log = for_run(run_dir, cfg) if cfg is not None else TensorBoardLog(run_dir)
    for rec in sorted(train + ev, key=lambda r: (r["step"], r.get("split") == "eval")):
        log.record(rec)
    plots_dir = os.path.join(run_dir, "plots")
    if os.path.isdir(plots_dir):
        last = max([r["step"] for r in train + ev], default=0)
        log.images(sorted(os.path.join(plots_dir, p) for p in os.listdir(plots_dir)
                          if p.endswith(".png")), last)
    log.close()
    return log.logdir
