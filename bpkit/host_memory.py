"""Keep freed host memory for reuse, so that a CPU train step does not page-fault its
temporaries in afresh on every call.

XLA's CPU backend allocates one buffer for all temporaries of a compiled program each time it
runs (``posix_memalign`` from a worker thread) and frees it at the end. glibc serves an
allocation that large (above 32 MiB, or above 64 MiB in a worker thread's arena) with a fresh
``mmap`` and gives it back with ``munmap``, so every call page-faults the whole buffer in and
the kernel zero-fills it: 106 MB, 25,900 page faults per step for the reference LSTM (counted
with ``getrusage``), 144 MB for the GPT. Measured on the 2-core CPU of docs/benchmarks.md, in
back-to-back processes (the setting is per process): LSTM step 71 -> 45 ms, GRU 51 -> 36 ms
(JAX 0.10.2), GPT 136 -> 100 ms (JAX 0.12).

``reuse_host_memory()`` asks glibc (``mallopt``) to keep such memory in its heap:

* ``M_ARENA_MAX = 1``: worker threads allocate from the main arena, whose heap can grow past
  64 MiB (a thread arena's cannot, so its large blocks are always mapped afresh);
* ``M_MMAP_MAX = 0``: large blocks come from the heap, not from their own mappings (glibc still
  maps one if the heap cannot grow);
* ``M_TRIM_THRESHOLD = 2**31 - 1``: freed memory at the top of the heap stays there.

The price is the one every caching allocator pays (PyTorch's included): the process keeps its
peak host memory until it exits. It must run before JAX starts its CPU backend (the first
computation, ``jax.devices()``): threads that already allocated keep their arenas. ``bpkit
train``, ``eval``, ``parity``, ``sweep`` and ``bench`` call it (``run.host_memory: reuse``, the
default; ``system`` leaves glibc alone); in your own program call it first thing, or set
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment.
On other C libraries (macOS, musl) it does nothing. GPU and TPU memory are not affected.
"""
from __future__ import annotations

import ctypes
import sys
import warnings

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))

_status = "system"  # what this process does: "reused" once the settings are applied


def _glibc():
    """The C library, if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError on musl)
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from bpkit.engine import compat
    return compat.backends_are_initialized()


def reuse_host_memory(*, quiet: bool = False) -> bool:
    """Apply the settings above; ``True`` if they are in force for this process's JAX backend.

    ``False`` (nothing changed) on a C library other than glibc, or, with a warning unless
    ``quiet``, when JAX's backend already runs (call this before the first JAX computation).
    ``status()`` tells afterwards which it was."""
    global _status
    if _status == "reused":
        return True
    libc = _glibc()
    if libc is None:
        return False
    if _backend_started():
        if quiet:
            return False
        warnings.warn("reuse_host_memory() was called after JAX started its backend; its "
                      "worker threads keep their own allocators, so nothing changed. Call it "
                      "before the first JAX computation (or set MALLOC_ARENA_MAX=1 "
                      "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647).", stacklevel=2)
        return False
    if all(libc.mallopt(param, value) == 1 for param, value in SETTINGS):
        _status = "reused"
    return _status == "reused"


def status() -> str:
    """``"reused"`` after ``reuse_host_memory()`` took effect in this process, else
    ``"system"`` (glibc's defaults, or environment variables set by the user)."""
    return _status
