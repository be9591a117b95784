"""Fused ops vs their unfused references: jitted forward + backward, median of interleaved runs.

    python scripts/bench_fused.py [--reps 30] [--engine jax|bpkit] [--small] [--loss linear|sin]
                                  [--json out.json]

For each op, ``loss = sum(op(*args) * w)`` is differentiated w.r.t. its floating inputs under
``jax.jit`` (by ``jax.grad`` or ``bpkit.grad``: both run the fused op's hand-written backward
and differentiate the reference by the chain rule). ``w``, the cotangent reaching the op, is an
argument of the jitted step: were it a constant, XLA would fold it into the backward at compile
time, which no model's step allows. ``--loss sin`` takes ``sum(sin(op(*args)) * w)``, so the
cotangent depends on the op's output (the sine's cost then dilutes the ratios). The fused and
reference steps run alternately, so machine noise hits both alike; the ratio is
median(fused) / median(reference) (< 1: the fused op is faster). The MiB columns are XLA's
scratch memory for each compiled step (``memory_analysis().temp_size_in_bytes``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import bpkit
from bpkit import ops
from bpkit.ops import reference


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def cases(small: bool):
    b, c = (512, 256) if small else (4096, 1024)
    rows, d = (2048, 256) if small else (16384, 768)
    bt, t, h, hd = (4, 128, 4, 32) if small else (8, 512, 8, 64)
    n = 32 if small else 128  # images per conv batch
    labels = jnp.asarray(np.random.default_rng(1).integers(0, c, (b,)), jnp.int32)
    attn_args = tuple(_normal(i, (bt, t, h, hd)) for i in range(3))
    return [
        (f"softmax_cross_entropy ({b}, {c})", lambda z: ops.softmax_cross_entropy(z, labels),
         lambda z: reference.softmax_cross_entropy(z, labels), (_normal(0, (b, c)),)),
        (f"layer_norm ({rows}, {d})", ops.layer_norm, reference.layer_norm,
         (_normal(0, (rows, d)), _normal(1, (d,)), _normal(2, (d,)))),
        (f"attention ({bt}, {t}, {h}, {hd})", ops.attention, reference.attention, attn_args),
        (f"attention causal ({bt}, {t}, {h}, {hd})",
         lambda q, k, v: ops.attention(q, k, v, causal=True),
         lambda q, k, v: reference.attention(q, k, v, causal=True), attn_args),
        (f"conv ({n}, 28, 28, 1) 3x3 -> 16", ops.conv, reference.conv,
         (_normal(0, (n, 28, 28, 1)), _normal(1, (3, 3, 1, 16)))),
        (f"conv ({n}, 32, 32, 3) 3x3 -> 32", ops.conv, reference.conv,
         (_normal(0, (n, 32, 32, 3)), _normal(1, (3, 3, 3, 32)))),
    ]


def step_fn(op, args, engine, loss):
    """``jit(grad(loss))`` as a function of ``(*args, w)``."""
    grad = jax.grad if engine == "jax" else bpkit.grad
    head = jnp.sin if loss == "sin" else (lambda y: y)
    argnums = tuple(range(len(args)))
    return jax.jit(grad(lambda *a: jnp.sum(head(op(*a[:-1])) * a[-1]), argnums))


def temp_mib(fn, args) -> float:
    """XLA's scratch memory for the compiled step (MiB; NaN where the backend reports none)."""
    stats = fn.lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes / 2**20 if stats is not None else float("nan")


def time_once(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--engine", choices=["jax", "bpkit"], default="jax")
    p.add_argument("--small", action="store_true", help="small shapes (for slow CPUs)")
    p.add_argument("--loss", choices=["linear", "sin"], default="linear",
                   help="the head on the op's output (see above)")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, engine: {a.engine}.grad, loss: {a.loss}, "
          f"reps: {a.reps}")
    print(f"{'op':44s} {'fused ms':>10s} {'ref ms':>10s} {'fused/ref':>10s} "
          f"{'fused MiB':>10s} {'ref MiB':>10s}")
    results = []
    for name, fused, ref, args in cases(a.small):
        args = (*args, _normal(9, jax.eval_shape(fused, *args).shape))  # the loss's weights w
        f, r = step_fn(fused, args, a.engine, a.loss), step_fn(ref, args, a.engine, a.loss)
        for fn in (f, r):  # compile and warm up
            time_once(fn, args)
            time_once(fn, args)
        tf, tr = [], []
        for _ in range(a.reps):
            tf.append(time_once(f, args))
            tr.append(time_once(r, args))
        mf, mr = statistics.median(tf) * 1e3, statistics.median(tr) * 1e3
        memf, memr = temp_mib(f, args), temp_mib(r, args)
        results.append({"op": name, "fused_ms": mf, "reference_ms": mr, "ratio": mf / mr,
                        "fused_temp_mib": memf, "reference_temp_mib": memr})
        print(f"{name:44s} {mf:10.3f} {mr:10.3f} {mf / mr:10.2f} {memf:10.1f} {memr:10.1f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "engine": a.engine,
                       "loss": a.loss, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
