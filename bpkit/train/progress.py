"""Progress of a run on the console: a tqdm bar on a terminal, log lines otherwise.

Compilation is timed apart: the first step of a run (or of a resumed run) traces and
compiles the jitted step, which can take longer than hundreds of later steps, so it is
reported once ("compiled in 16.2 s") and left out of the throughput and the ETA. The bar is
started after it; the ETA is the remaining steps at the mean step time since then. Numbers
are printed with 4 significant digits (``fmt``), throughput as whole examples per second.

Achieved FLOP/s: XLA's cost analysis counts the floating-point operations of one compiled
step (``xla_flops`` on the lowered step: no second compilation); each log line's FLOP/s is
that count times the window's steps per second, and with ``run.peak_flops`` (the devices'
peak, from their data sheet) the model FLOP/s utilisation ``mfu = FLOP/s / peak``, as nanoGPT
and MaxText report it. The count is XLA's, so it includes the backward pass and the optimizer
update (not the 6·N·tokens estimate); recomputation under a checkpoint policy counts too.
"""
from __future__ import annotations

import datetime
import sys
import time
from typing import Any, Callable

METRIC_ORDER = ("loss", "accuracy", "d_loss", "g_loss", "grad_norm", "learning_rate")


def fmt(x) -> str:
    """4 significant digits, trailing zeros kept so columns read alike: ``1.000``,
    ``0.4680``, ``0.0001000``, ``1.235e+04``; ``n/a`` for ``None``."""
    if x is None:
        return "n/a"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return f"{float(x):#.4g}"


def fmt_metrics(m: dict) -> str:
    return "  ".join(f"{k} {fmt(m[k])}" for k in METRIC_ORDER if m.get(k) is not None)


def xla_flops(staged) -> float | None:
    """XLA's FLOP count of a lowered or compiled computation (``jax.jit(f).lower(...)``), or
    ``None`` where the backend gives no cost analysis."""
    try:
        cost = staged.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops")) if cost and cost.get("flops") else None
    except Exception:  # cost analysis is optional on some backends
        return None


def step_flops(step_fn, *args) -> float | None:
    """FLOPs of one call of the jitted ``step_fn`` on arguments shaped (and sharded) like
    ``args``; lowering reuses the traced step, so this costs no compilation."""
    import jax

    def like(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    try:
        return xla_flops(step_fn.lower(*jax.tree_util.tree_map(like, args)))
    except Exception:  # not a jitted function, or a backend without cost analysis
        return None


def fmt_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


class Progress:
    """``compiling()`` before the first step, ``compiled(step)`` after it returns, then
    ``update(step)`` after every step and ``window(step, metrics)`` at each log point (the
    line, or the bar's postfix); ``write(msg)`` prints above the bar; ``close()``.

    ``mode``: ``bar`` or ``log``; ``clock``: seconds (injectable for tests)."""

    def __init__(self, total: int, start: int, batch_size: int, mode: str,
                 out: Callable[[str], None] = print, clock: Callable[[], float] = time.time,
                 peak_flops: float | None = None):
        self.total, self.batch_size, self.mode = total, batch_size, mode
        self.peak_flops = peak_flops
        self.flops_per_step = None      # XLA's count for one step (set after the first step)
        self.out, self.clock = out, clock
        self.bar = None
        self.t_compile = None           # when the first step was dispatched
        self.compile_seconds = None
        self.t0, self.step0 = None, start   # after the first step: the timing origin
        self.t_window, self.step_window = None, start

    def compiling(self) -> None:
        self.t_compile = self.clock()

    def compiled(self, step: int) -> None:
        """The first step has returned: report its time, start the clock (and the bar)."""
        now = self.clock()
        self.compile_seconds = now - (self.t_compile if self.t_compile is not None else now)
        self.out(f"  compiled in {self.compile_seconds:.1f} s (the first step: tracing and "
                 "XLA compilation; left out of the throughput and the ETA)")
        self.t0 = self.t_window = now
        self.step0 = self.step_window = step
        if self.mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=step, dynamic_ncols=True, unit="step",
                            file=sys.stderr)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def rate(self, step: int) -> float | None:
        """Examples per second since the previous window (``None`` before any step after
        the first)."""
        now = self.clock()
        if self.t_window is None or step <= self.step_window:
            return None
        r = (step - self.step_window) * self.batch_size / max(now - self.t_window, 1e-9)
        self.t_window, self.step_window = now, step
        return r

    def eta(self, step: int) -> float | None:
        """Seconds left at the mean step time since the first step."""
        if self.t0 is None or step <= self.step0:
            return None
        per_step = (self.clock() - self.t0) / (step - self.step0)
        return per_step * (self.total - step)

    def window(self, step: int, metrics: dict) -> float | None:
        """Report the logging window ending at ``step``; returns its throughput."""
        eta = self.eta(step)
        rate = self.rate(step)
        speed = f"{rate:,.0f} ex/s" if rate is not None else "- ex/s"
        metrics.update(self.utilisation(rate))
        if "flops_per_second" in metrics:
            speed += f"  {fmt(metrics['flops_per_second'] / 1e9)} GFLOP/s" + (
                f" (MFU {100 * metrics['mfu']:.1f}%)" if "mfu" in metrics else "")
        if self.bar is not None:
            self.bar.set_postfix_str(f"{fmt_metrics({'loss': metrics.get('loss')})}  {speed}")
        else:
            left = f"  ETA {fmt_duration(eta)}" if eta is not None and step < self.total else ""
            self.out(f"step {step:>6}/{self.total}  {fmt_metrics(metrics)}  {speed}{left}")
        return rate

    def utilisation(self, rate: float | None) -> dict[str, float]:
        """``flops_per_second`` (and ``mfu`` with a peak) at ``rate`` examples per second."""
        if rate is None or not self.flops_per_step:
            return {}
        flops = rate / self.batch_size * self.flops_per_step
        return {"flops_per_second": flops,
                **({"mfu": flops / self.peak_flops} if self.peak_flops else {})}

    def summary(self, step: int) -> dict[str, Any]:
        """summary.json's throughput: compile time, then examples and FLOP/s (and MFU) over the
        whole run after the first step."""
        timed = self.t0 is not None and step > self.step0
        rate = ((step - self.step0) * self.batch_size / max(self.clock() - self.t0, 1e-9)
                if timed else None)
        return {"compile_seconds": self.compile_seconds, "examples_per_second": rate,
                "flops_per_step": self.flops_per_step, **self.utilisation(rate)}

    def write(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else self.out)(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
