"""bpkit's gradient of a ``while_loop`` vs ``jax.grad`` of the same loop written as a ``scan``.

    python scripts/bench_while.py [--sizes 100 1000 10000] [--checkpoints 8 16 32]
                                  [--reps 5] [--batch 16] [--width 32] [--hidden 64] [--json out.json]

The loop is ``n`` explicit Euler steps of a small neural ODE over ``t in [0, 1]``,
``x <- x + h * tanh(x W1 + b1) W2`` with ``h = 1/n`` and ``x: (batch, width)``. ``jax.grad`` differentiates it as ``lax.scan(length=n)``, storing the
residuals of every step; bpkit differentiates a ``lax.while_loop`` whose trip count ``n`` is a
run-time argument (no bound is known when compiling), keeping ``c`` checkpoints
(``bpkit.grad(..., while_checkpoints=c)``). Both steps are jitted; runs alternate (scan, bpkit
c1, c2, ...) so machine noise hits all alike; times are medians. Memory is XLA's scratch memory
of each compiled step (``memory_analysis().temp_size_in_bytes``). ``body evals`` is what the
schedule spends per iteration: ``2 + R(n, c) / n`` body evaluations (forward, recomputation,
and the forward inside each body VJP) plus one body backward; the scan spends 1 + 1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bpkit
from bpkit.rules.loops import recomputed_steps


def make_problem(batch: int, width: int, hidden: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {"w1": jnp.asarray(rng.standard_normal((width, hidden)) / np.sqrt(width), jnp.float32),
              "b1": jnp.zeros((hidden,), jnp.float32),
              "w2": jnp.asarray(rng.standard_normal((hidden, width)) / np.sqrt(hidden), jnp.float32)}
    x0 = jnp.asarray(rng.standard_normal((batch, width)), jnp.float32)
    return params, x0


def euler_step(p, x, h):
    return x + h * (jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"])


def scan_loss(n: int):
    def loss(p, x0, h):
        x, _ = lax.scan(lambda x, _: (euler_step(p, x, h), None), x0, None, length=n)
        return jnp.sum(x * x)
    return loss


def while_loss(p, x0, h, n):
    _, x = lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, euler_step(p, c[1], h)),
                          (0, x0))
    return jnp.sum(x * x)


def temp_mib(jitted, *args) -> float:
    analysis = jitted.lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench(sizes, checkpoints, reps, batch, width, hidden):
    params, x0 = make_problem(batch, width, hidden)
    rows = []
    for n in sizes:
        ref = jax.jit(jax.grad(scan_loss(n)))
        mine = {c: jax.jit(bpkit.grad(while_loss, while_checkpoints=c)) for c in checkpoints}
        n_arg, h = jnp.asarray(n, jnp.int32), jnp.asarray(1.0 / n, jnp.float32)
        g_ref = ref(params, x0, h)
        for c, f in mine.items():  # same gradient, before anything is timed
            for a, b in zip(jax.tree_util.tree_leaves(f(params, x0, h, n_arg)),
                            jax.tree_util.tree_leaves(g_ref)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                                           atol=1e-4 * float(np.max(np.abs(b))))
        times = {"scan": []} | {c: [] for c in checkpoints}
        for _ in range(reps if n < 10000 else max(1, reps // 3)):
            times["scan"].append(timed(ref, params, x0, h))
            for c, f in mine.items():
                times[c].append(timed(f, params, x0, h, n_arg))
        row = {"n": n, "scan_ms": 1e3 * statistics.median(times["scan"]),
               "scan_mib": temp_mib(ref, params, x0, h), "bpkit": {}}
        for c, f in mine.items():
            ms = 1e3 * statistics.median(times[c])
            mib = temp_mib(f, params, x0, h, n_arg)
            row["bpkit"][c] = {"ms": ms, "mib": mib, "time_ratio": ms / row["scan_ms"],
                               "body_evals_per_step": 2 + recomputed_steps(n, c) / n}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row) -> str:
    cells = [f"{row['n']:,}", f"{row['scan_ms']:.1f} ms, {row['scan_mib']:.2f} MiB"]
    for c, r in row["bpkit"].items():
        cells.append(f"{r['ms']:.1f} ms ({r['time_ratio']:.2f}x), {r['mib']:.2f} MiB, "
                     f"{r['body_evals_per_step']:.2f}")
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--json", default=None)
    a = parser.parse_args(argv)
    print(f"JAX {jax.__version__}, {jax.devices()[0].platform}; state ({a.batch}, {a.width}) "
          f"float32, hidden {a.hidden}")
    header = ["n", "jax.grad of scan"] + [f"bpkit while, c={c}: time (ratio), scratch, "
                                          "body evals/step" for c in a.checkpoints]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = bench(a.sizes, a.checkpoints, a.reps, a.batch, a.width, a.hidden)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
