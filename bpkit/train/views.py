"""What a run shows besides ``metrics.jsonl``, kept out of the loop: the progress bar or log
lines (``progress.py``), TensorBoard events (``tensorboard.py``: every metrics record, the
schedule's learning rate at every step, histograms at the diagnostics cadence, the config,
the plots), and at the end the plots, the language model's text sample and ``report.html``
(``report.py``), with ``environment.json`` and ``parity.json`` recorded for it.

The loop calls ``RunViews(cfg, run, con, start)``, ``parity(report)``, ``first_step`` /
``stepped(step)`` around the steps, ``window(step, rec)`` per log line, ``histograms`` when
backward signals are taken, and ``finish(...)``; every call is a no-op where it does not apply
(a non-main process of a multi-host run writes nothing).
"""
from __future__ import annotations

import sys
from typing import Any

from bpkit.train.progress import step_flops

PARITY_EXAMPLES = 16  # rows of the first batch the start-of-run parity check differentiates


class RunViews:
    def __init__(self, cfg, run, con, start: int):
        from bpkit.train.progress import Progress
        self.cfg, self.run, self.con, self.main = cfg, run, con, run.main
        mode = cfg.run.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.progress = Progress(cfg.run.steps, start, cfg.data.batch_size,
                                 mode if self.main else "log", out=con.out,
                                 peak_flops=cfg.run.peak_flops)
        self.tb = None
        if self.main:
            from bpkit.report import record_environment
            from bpkit.train.tensorboard import for_run
            record_environment(run.path, cfg.run.xla_options)
            self.tb = for_run(run.path, cfg, start=start, warn=con.warn)
            run.metrics.listeners.append(self.tb.record)

    # ------------------------------------------------------------------ during the run
    def parity(self, report) -> None:
        if self.main:
            from bpkit.report import record_parity
            record_parity(self.run.path, report, PARITY_EXAMPLES)

    def stepping(self, steps_run: int) -> None:
        """Before a step: the first one compiles."""
        if steps_run == 0:
            self.progress.compiling()

    def stepped(self, step: int, steps_run: int, step_fn=None, args=()) -> None:
        """After a step returned (``steps_run`` counted it); the first one's ``step_fn`` and
        ``args`` (the new state, the batch) give XLA's FLOP count of a step."""
        if steps_run == 1:
            self.progress.compiled(step)
            self.progress.flops_per_step = step_flops(step_fn, *args) if step_fn else None
            self.con.bar = self.progress.bar  # log and warning lines print above the bar
        self.progress.update(step)

    def window(self, step: int, metrics: dict) -> float | None:
        """The log line (or bar postfix) of a window; its throughput, compilation left out."""
        return self.progress.window(step, metrics)

    def histograms(self, step: int, params, grads=None) -> None:
        """Parameter and gradient histograms (TensorBoard) at a backward-signals step. Every
        process calls this: arrays split across processes (fsdp) are gathered first."""
        params, grads = _whole((params, grads))
        if self.tb is not None:
            self.tb.histograms(step, params, grads)

    # ------------------------------------------------------------------ at the end
    def finish(self, task, state, ds, step: int) -> str | None:
        """Plots (with ``samples.png``/``fit.png`` from the final parameters), the text sample
        of a language model (printed and saved), the plots into TensorBoard, report.html.
        Returns the text sample, if any. Nothing here fails a finished run. Every process
        calls this: parameters split across processes (fsdp) are gathered first."""
        self.progress.close()
        self.con.bar = None
        state = state._replace(**_whole({"params": state.params,
                                         "model_state": state.model_state}, host=True))
        if not self.main:
            return None
        from bpkit.report import record_sample, write_report
        from bpkit.train.outputs import Trained
        from bpkit.train.plots import plot_run
        sample = None
        if task.kind == "lm" and self.cfg.run.sample_length:
            from bpkit.train.loop import sample_text
            sample = sample_text(task, state.params, ds, self.cfg)
            record_sample(self.run.path, sample)
        paths: list[str] = []
        try:
            paths = plot_run(self.run.path, trained=Trained(
                self.cfg, ds, task, state.params, state.model_state, step))
        except Exception as e:  # plots are a convenience: never fail a finished run on them
            self.con.warn(f"warning: plots not written ({type(e).__name__}: {e})")
        if self.tb is not None:
            try:
                self.tb.images(paths, step)
            finally:
                self.close()
        try:
            write_report(self.run.path)
        except Exception as e:
            self.con.warn(f"warning: report.html not written ({type(e).__name__}: {e})")
        return sample

    def close(self) -> None:
        """Flush and close the TensorBoard file (also when the run stops early)."""
        if self.tb is not None:
            if self.tb.record in self.run.metrics.listeners:
                self.run.metrics.listeners.remove(self.tb.record)
            self.tb.close()
            self.tb = None
        self.progress.close()


def _whole(tree, *, host: bool = False):
    """``tree`` with its arrays split across processes gathered (a collective: every process
    of a multi-process run calls it), so process 0 alone can read them; ``host``: every array
    as NumPy, so process 0 alone can also compute with them (plots, the text sample)."""
    import jax
    if jax.process_count() == 1:
        return tree
    from bpkit import sharding
    return sharding.to_host(tree) if host else sharding.gather_split(tree)


def summary_extras(task, last_eval: dict) -> dict[str, Any]:
    """What summary.json adds by task: held-out accuracy for classifiers and language models
    (next-token accuracy), the GAN's chamfer distance."""
    extras: dict[str, Any] = {"eval_accuracy": last_eval.get("accuracy")
                              if task.kind in ("classifier", "lm") else None}
    if task.kind == "gan":
        extras["eval_chamfer"] = last_eval.get("chamfer")
    return extras
