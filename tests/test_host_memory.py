"""bpkit.host_memory: freed host memory is kept, so XLA's CPU temporaries are not page-faulted
in afresh on every call (what this changes is measured in docs/benchmarks.md; here: that it
takes effect, and that it is refused when it cannot)."""
import json
import statistics
import subprocess
import sys
import textwrap
import warnings

import pytest

from bpkit import host_memory

# A jitted program with large temporaries (74 MiB) called in a fresh process: after 10 calls
# (glibc's heap settles within about 7 once memory is reused) the minor page faults of each of
# 12 more, and the temporary bytes. (With memory reused, an occasional call still faults: XLA
# frees a buffer on a worker thread, sometimes after the next call has allocated its own.)
_PROGRAM = textwrap.dedent("""
    import json, resource, sys
    import bpkit
    applied = bpkit.reuse_host_memory() if sys.argv[1] == "reuse" else False
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.cumsum(jnp.exp(x), axis=0) * x[::-1]))
    x = jnp.ones((1536, 4096), jnp.float32) * 1e-3
    compiled = f.lower(x).compile()
    for _ in range(10):
        jax.block_until_ready(compiled(x))
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(compiled(x))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "status": bpkit.host_memory.status(), "faults": faults,
                      "temp": compiled.memory_analysis().temp_size_in_bytes}))
""")


def _run(setting: str) -> dict:
    p = subprocess.run([sys.executable, "-c", _PROGRAM, setting], capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only")
def test_a_large_temporary_is_page_faulted_every_call_unless_memory_is_reused():
    system, reused = _run("system"), _run("reuse")
    pages = system["temp"] / 4096
    assert system["temp"] >= 64 * 2**20  # above glibc's mmap thresholds (32 MiB, 64 MiB)
    assert system["status"] == "system" and min(system["faults"]) >= 0.5 * pages
    assert reused["applied"] and reused["status"] == "reused"
    assert statistics.median(reused["faults"]) <= 0.02 * pages, reused["faults"]


def test_refused_after_jax_started_or_without_glibc(monkeypatch):
    import jax
    jax.devices()  # this test process's backend runs
    monkeypatch.setattr(host_memory, "_status", "system")
    if host_memory._glibc() is not None:
        with pytest.warns(UserWarning, match="before the first JAX computation"):
            assert host_memory.reuse_host_memory() is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert host_memory.reuse_host_memory(quiet=True) is False
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.reuse_host_memory() is False
    assert host_memory.status() == "system"
