"""SIGINT, SIGTERM and SIGHUP: honoured from the first instant, never swallowed.

``bpkit`` installs ``install()``'s handlers as its first act. Until training can save, a stop
signal raises ``Interrupted`` at once (data generation, compilation and the parity check stop
there, with nothing written). Inside ``deferred()`` -- the training loop -- the handler only
records the signal; the loop finishes the step it is in, saves a checkpoint and raises
``Interrupted`` itself. Every signal is also recorded, so one that arrives where Python drops
exceptions (a finalizer, JAX's garbage-collection callback) is still honoured by
``raise_if_received``; Python's report of that dropped exception is silenced (``_quiet_unraisable``),
since nothing was lost. The process exits with status 128 + the signal's number (130, 143, 129).
"""
from __future__ import annotations

import contextlib
import signal
import sys

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
                     if s is not None)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived. ``signum``: which; ``saved_step``: the step of the checkpoint
    saved on the way out (``None``: nothing was saved)."""

    def __init__(self, signum: int = signal.SIGINT, saved_step: int | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.saved_step = saved_step

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_received: list[int] = []
_deferring = [False]


def _handler(signum, frame):
    _received.append(signum)
    if not _deferring[0]:
        raise Interrupted(signum)


_previous_unraisablehook = [sys.unraisablehook]


def _quiet_unraisable(unraisable):
    """``sys.unraisablehook``: a stop signal raised where Python cannot propagate it (it prints
    "Exception ignored in ..." and a traceback) was recorded by ``_handler``, so it is dropped
    without a word; any other unraisable exception goes to the previous hook."""
    if isinstance(unraisable.exc_value, Interrupted):
        return
    _previous_unraisablehook[0](unraisable)


def install() -> dict:
    """Route the stop signals to this module (main thread only); returns the old handlers."""
    if sys.unraisablehook is not _quiet_unraisable:
        _previous_unraisablehook[0] = sys.unraisablehook
        sys.unraisablehook = _quiet_unraisable
    old = {}
    for s in STOP_SIGNALS:
        try:
            old[s] = signal.signal(s, _handler)
        except (ValueError, OSError):  # not the main thread, or not allowed here
            pass
    return old


def received() -> int | None:
    """The first stop signal received so far, or ``None``."""
    return _received[0] if _received else None


def raise_if_received(step: int | None = None, every: int = 1) -> None:
    """Raise ``Interrupted`` if a stop signal arrived. With ``step``, in a multi-process run,
    the processes decide together, at every ``every``-th step only: each must stop at the same
    step (the checkpoint save is collective), and a signal reaches them at different steps."""
    if step is not None and _process_count() > 1:
        if step % every == 0:
            signum = _any_process_received()
            if signum:
                raise Interrupted(signum)
        return
    if _received:
        raise Interrupted(_received[0])


def _process_count() -> int:
    jax = sys.modules.get("jax")  # not imported: a single process (no jax.distributed)
    return jax.process_count() if jax is not None else 1


def _any_process_received() -> int:
    """The first stop signal of the lowest-numbered process that received one (0: none)."""
    import numpy as np
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(_received[0] if _received else 0))
    return next((int(f) for f in np.ravel(flags) if f), 0)


@contextlib.contextmanager
def deferred():
    """Inside: stop signals are recorded, not raised (the caller checks ``received()`` at
    points where it can save). Installs the handlers if they are not (``loop.train`` called
    from Python) and restores the previous ones on the way out."""
    ours = {s: signal.getsignal(s) is _handler for s in STOP_SIGNALS}
    old = install() if not all(ours.values()) else {}
    was = _deferring[0]
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = was
        for s, h in old.items():
            if not ours.get(s):
                signal.signal(s, h)


def reset() -> None:
    """Forget the signals received (a new command in the same process, as the tests run)."""
    _received.clear()
