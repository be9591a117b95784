"""bpkit.train.stopping: a stop signal is never lost and never printed as a traceback."""
import gc
import signal
import sys

import pytest

from bpkit.train import stopping


@pytest.fixture
def handlers():
    hook = sys.unraisablehook
    old = stopping.install()
    stopping.reset()
    yield
    for s, h in old.items():
        signal.signal(s, h)
    sys.unraisablehook = hook
    stopping.reset()


class _RaisesWhenCollected:
    def __init__(self, exc):
        self.exc = exc

    def __del__(self):
        raise self.exc


def test_a_signal_dropped_in_a_finalizer_is_silent_and_still_honoured(handlers, capsys):
    """Python drops an exception raised in a finalizer (JAX's GC callback is one) and prints
    "Exception ignored in ..."; the handler recorded the signal, so that report is silenced and
    ``raise_if_received`` raises it later."""
    try:
        stopping._handler(signal.SIGINT, None)
    except stopping.Interrupted as e:
        dropped = e
    _RaisesWhenCollected(dropped)
    gc.collect()
    assert "Exception ignored" not in capsys.readouterr().err
    with pytest.raises(stopping.Interrupted) as raised:
        stopping.raise_if_received()
    assert raised.value.signum == signal.SIGINT


def test_other_unraisable_exceptions_are_still_reported(handlers):
    seen = []
    sys.unraisablehook = lambda u: seen.append(u.exc_value)
    stopping.install()  # wraps the hook in place now
    _RaisesWhenCollected(ValueError("not a signal"))
    gc.collect()
    assert [str(e) for e in seen] == ["not a signal"]
