"""Differential fuzzing: random straight-line programs, bpkit.grad against jax.grad (float64).

``random_program(rng)`` builds a program from the primitives bpkit has rules for: elementwise
unary ops (with domain guards: ``log`` sees ``x*x + 0.5``, ``exp`` sees ``2*tanh(x)``), binary
ops (equal shapes, size-1 stretching and scalars), broadcasts, reshapes, transposes, reductions
and cumulative reductions, ``dot_general`` with batch dimensions, slices, pads, concatenation,
gathers, ``select``, a small ``scan``, ``cond``, and ``jit``/``checkpoint`` wrappers. Every
value it creates goes into a pool that later steps draw from; the loss is a fixed random
weighting of the pool's last values, so cotangents reach every step.

``fuzz(n, seed)`` runs ``n`` programs (program ``i`` is ``random_program(default_rng([seed, i]))``,
so any one can be rebuilt alone) and returns a ``FuzzReport`` whose mismatches carry the
program as a jaxpr. ``python scripts/fuzz.py --n 2000 --seed 0`` runs it by hand.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bpkit.check.parity import float64_enabled
from bpkit.engine import api


@dataclass
class Program:
    """A random program: ``fun(*inputs)`` returns a scalar; ``steps`` names its operations."""

    fun: Callable
    inputs: tuple
    steps: list[str]

    def jaxpr(self) -> str:
        return str(jax.make_jaxpr(self.fun)(*self.inputs))


# --- the operations: builder(rng, shapes) -> (name, fn, input indices) or None ------------------
def _pick(rng, shapes, pred=lambda s: True):
    idx = [i for i, s in enumerate(shapes) if pred(s)]
    return int(rng.choice(idx[-6:])) if idx else None  # favour recent values: deeper programs


UNARY = {
    "sin": jnp.sin, "cos": jnp.cos, "tanh": jnp.tanh, "logistic": jax.nn.sigmoid,
    "exp": lambda x: jnp.exp(2 * jnp.tanh(x)), "log": lambda x: jnp.log(x * x + 0.5),
    "log1p": lambda x: jnp.log1p(jnp.abs(x)), "sqrt": lambda x: jnp.sqrt(x * x + 0.5),
    "rsqrt": lambda x: lax.rsqrt(x * x + 1.0), "abs": jnp.abs, "square": jnp.square,
    "cube": lambda x: lax.integer_pow(x, 3), "erf": lax.erf, "atan": jnp.arctan,
    "sinh": lambda x: jnp.sinh(jnp.tanh(x)), "expm1": lambda x: jnp.expm1(jnp.tanh(x)),
    "relu": jax.nn.relu, "gelu": jax.nn.gelu, "softplus": jax.nn.softplus, "neg": jnp.negative,
    "asinh": jnp.arcsinh, "atanh": lambda x: jnp.arctanh(0.9 * jnp.tanh(x)),
    "cbrt": lambda x: lax.cbrt(x * x + 0.5), "silu": jax.nn.silu,
}

BINARY = {
    "add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply,
    "div": lambda x, y: x / (y * y + 1.0), "max": jnp.maximum, "min": jnp.minimum,
    "pow": lambda x, y: jnp.power(x * x + 0.5, jnp.tanh(y)), "atan2": jnp.arctan2,
    "where": lambda x, y: jnp.where(x > y, x * 2.0, y),
}


def _unary(rng, shapes):
    name = str(rng.choice(sorted(UNARY)))
    return f"unary:{name}", UNARY[name], [_pick(rng, shapes)]


def _binary(rng, shapes):
    name = str(rng.choice(sorted(BINARY)))
    i = _pick(rng, shapes)
    s = shapes[i]
    same = [j for j, t in enumerate(shapes) if t == s]
    mode = rng.integers(3)
    if mode == 0 and len(same) > 1:  # two values of one shape
        return f"binary:{name}", BINARY[name], [i, int(rng.choice(same))]
    if mode == 1 and s:  # size-1 stretching of a reduced copy
        axes = tuple(sorted(rng.choice(len(s), size=rng.integers(1, len(s) + 1), replace=False)))
        fn = BINARY[name]
        return (f"binary:{name}(keepdims{axes})",
                lambda x: fn(x, jnp.sum(x, axis=axes, keepdims=True)), [i])
    fn = BINARY[name]
    c = float(np.round(rng.uniform(-2, 2), 2))
    return f"binary:{name}(scalar {c})", lambda x: fn(x, c), [i]


def _broadcast(rng, shapes):
    i = _pick(rng, shapes, lambda s: len(s) < 3)
    if i is None:
        return None
    s = shapes[i]
    pos = int(rng.integers(len(s) + 1))
    out = s[:pos] + (2,) + s[pos:]
    dims = tuple(d for d in range(len(out)) if d != pos)
    return (f"broadcast_in_dim{out}", lambda x: lax.broadcast_in_dim(x, out, dims), [i])


def _reshape(rng, shapes):
    i = _pick(rng, shapes, lambda s: len(s) >= 1)
    if i is None:
        return None
    s = shapes[i]
    kind = rng.integers(3)
    if kind == 0:
        return "reshape(flatten)", lambda x: jnp.reshape(x, (-1,)), [i]
    if kind == 1:
        return f"reshape{s[::-1]}", lambda x: jnp.reshape(x, s[::-1]), [i]
    perm = tuple(int(p) for p in rng.permutation(len(s)))
    return f"transpose{perm}", lambda x: jnp.transpose(x, perm), [i]


def _reduce(rng, shapes):
    i = _pick(rng, shapes, lambda s: len(s) >= 1)
    if i is None:
        return None
    s = shapes[i]
    axis = int(rng.integers(len(s)))
    name = str(rng.choice(["sum", "max", "min", "prod", "mean", "logsumexp", "cumsum",
                           "cumprod", "cummax", "softmax"]))
    fns = {
        "sum": lambda x: jnp.sum(x, axis), "max": lambda x: jnp.max(x, axis),
        "min": lambda x: jnp.min(x, axis), "prod": lambda x: jnp.prod(jnp.tanh(x) + 1.5, axis),
        "mean": lambda x: jnp.mean(x, axis), "logsumexp": lambda x: jax.nn.logsumexp(x, axis),
        "cumsum": lambda x: jnp.cumsum(x, axis), "cumprod": lambda x: lax.cumprod(jnp.tanh(x) + 1.5, axis),
        "cummax": lambda x: lax.cummax(x, axis), "softmax": lambda x: jax.nn.softmax(x, axis),
    }
    return f"reduce:{name}(axis={axis})", fns[name], [i]


def _dot(rng, shapes):
    i = _pick(rng, shapes, lambda s: len(s) >= 1)
    if i is None:
        return None
    a = shapes[i]
    ca = int(rng.integers(len(a)))
    cands = [(j, cb) for j, t in enumerate(shapes) for cb, n in enumerate(t) if n == a[ca]]
    j, cb = cands[int(rng.integers(len(cands)))]
    b = shapes[j]
    batch = ((), ())
    # a batch dimension when both operands have another axis of equal size
    others = [(x, y) for x in range(len(a)) for y in range(len(b))
              if x != ca and y != cb and a[x] == b[y]]
    if others and rng.integers(2):
        x, y = others[int(rng.integers(len(others)))]
        batch = ((x,), (y,))
    dims = (((ca,), (cb,)), batch)
    out_rank = len(a) + len(b) - 2 - 2 * len(batch[0]) + len(batch[0])
    if out_rank > 4:
        return None
    return f"dot_general{dims}", lambda x, y: lax.dot_general(x, y, dims), [i, j]


def _slicing(rng, shapes):
    i = _pick(rng, shapes, lambda s: len(s) >= 1 and max(s) >= 2)
    if i is None:
        return None
    s = shapes[i]
    axis = int(np.argmax(s))
    n = s[axis]
    kind = str(rng.choice(["slice", "rev", "pad", "concat", "dynamic_slice", "gather",
                           "dynamic_update_slice"]))
    if kind == "slice":
        stride = int(rng.integers(1, 3))
        return (f"slice(axis={axis}, stride={stride})",
                lambda x: lax.slice_in_dim(x, 1, n, stride=stride, axis=axis), [i])
    if kind == "rev":
        return f"rev({axis})", lambda x: lax.rev(x, (axis,)), [i]
    if kind == "pad":
        cfg = [(0, 0, 0)] * len(s)
        cfg[axis] = (1, -1, int(rng.integers(2)))
        return f"pad{cfg}", lambda x: lax.pad(x, jnp.asarray(0.5, x.dtype), cfg), [i]
    if kind == "concat":
        return f"concatenate(axis={axis})", lambda x: jnp.concatenate([x, jnp.sin(x)], axis), [i]
    if kind == "dynamic_slice":
        start = int(rng.integers(n))
        return (f"dynamic_slice(axis={axis}, start={start})",
                lambda x: lax.dynamic_slice_in_dim(x, jnp.int32(start), 1, axis), [i])
    if kind == "dynamic_update_slice":
        start = int(rng.integers(n))
        return (f"dynamic_update_slice(axis={axis}, start={start})",
                lambda x: lax.dynamic_update_slice_in_dim(
                    x, jnp.cos(lax.slice_in_dim(x, 0, 1, axis=axis)), jnp.int32(start), axis), [i])
    idx = rng.integers(0, n, size=int(rng.integers(1, 5)))
    return f"gather(axis={axis}, idx={idx.tolist()})", lambda x: jnp.take(x, jnp.asarray(idx), axis), [i]


def _control(rng, shapes):
    i = _pick(rng, shapes, lambda s: len(s) >= 1)
    if i is None:
        return None
    kind = str(rng.choice(["scan", "scan_reverse", "cond", "jit", "remat", "fori"]))
    if kind.startswith("scan"):
        rev = kind == "scan_reverse"

        def scan_fn(x):
            def step(c, xi):
                c = jnp.tanh(c * xi + 0.5 * c + xi)
                return c, c * xi
            c, ys = lax.scan(step, jnp.zeros_like(x[0]), x, reverse=rev)
            return ys + c[None]
        return kind, scan_fn, [i]
    if kind == "cond":
        return kind, lambda x: lax.cond(jnp.sum(x) > 0, jnp.sin, lambda v: v * v, x), [i]
    if kind == "fori":
        return kind, lambda x: lax.fori_loop(0, 3, lambda k, c: jnp.sin(c) * 1.1 + x, x), [i]
    inner = UNARY[str(rng.choice(sorted(UNARY)))]
    body = lambda x: inner(x) * jnp.cos(x)  # noqa: E731
    wrapped = jax.jit(body) if kind == "jit" else jax.checkpoint(body)
    return kind, wrapped, [i]


BUILDERS = [(_unary, 4), (_binary, 4), (_broadcast, 1), (_reshape, 1), (_reduce, 2), (_dot, 2),
            (_slicing, 2), (_control, 1)]


def random_program(rng: np.random.Generator, max_steps: int = 8) -> Program:
    """A random straight-line program over 1-3 float64 inputs, returning a scalar."""
    n_in = int(rng.integers(1, 4))
    shapes = [tuple(int(d) for d in rng.integers(1, 5, size=rng.integers(0, 4)))
              for _ in range(n_in)]
    inputs = tuple(jnp.asarray(rng.uniform(-1.5, 1.5, s)) for s in shapes)
    builders, weights = zip(*BUILDERS)
    p = np.asarray(weights, float) / sum(weights)
    ops, steps = [], []
    for _ in range(int(rng.integers(2, max_steps + 1))):
        built = builders[rng.choice(len(builders), p=p)](rng, shapes)
        if built is None:
            continue
        name, fn, idx = built
        out = jax.eval_shape(fn, *[jax.ShapeDtypeStruct(shapes[k], jnp.float64) for k in idx])
        if out.size > 256:
            continue
        ops.append((fn, idx))
        steps.append(f"v{len(shapes)} = {name}({', '.join(f'v{k}' for k in idx)})")
        shapes.append(tuple(out.shape))
    n_out = min(3, len(shapes))
    weights_out = [jnp.asarray(rng.standard_normal(s)) for s in shapes[-n_out:]]

    def fun(*xs):
        vals = list(xs)
        for fn, idx in ops:
            vals.append(fn(*[vals[k] for k in idx]))
        return sum(jnp.sum(w * v) for w, v in zip(weights_out, vals[-n_out:]))

    return Program(fun, inputs, steps)


# --- running -----------------------------------------------------------------------------------
@dataclass
class FuzzResult:
    index: int
    ok: bool
    max_abs: float = 0.0
    error: str | None = None
    steps: list = field(default_factory=list)
    jaxpr: str = ""


@dataclass
class FuzzReport:
    seed: int
    results: list[FuzzResult]
    seconds: float

    @property
    def mismatches(self) -> list[FuzzResult]:
        return [r for r in self.results if not r.ok]

    def __str__(self) -> str:
        lines = [f"fuzz seed={self.seed}: {len(self.results)} programs, "
                 f"{len(self.mismatches)} mismatches/errors, {self.seconds:.1f}s"]
        for r in self.mismatches:
            lines.append(f"\n--- program {r.index} (rebuild: random_program("
                         f"np.random.default_rng([{self.seed}, {r.index}]))) ---")
            lines.append(r.error or f"max |bpkit - jax.grad| = {r.max_abs:.3e}")
            lines.extend("  " + s for s in r.steps)
            lines.append(r.jaxpr)
        return "\n".join(lines)


def check_program(prog: Program, jit: bool = False, rtol: float = 1e-8) -> FuzzResult:
    """Compare bpkit.grad and jax.grad on every input of ``prog``."""
    argnums = tuple(range(len(prog.inputs)))
    try:
        want = jax.grad(prog.fun, argnums)(*prog.inputs)
    except Exception:  # noqa: BLE001  (JAX itself cannot differentiate it: not a bpkit bug)
        return FuzzResult(-1, True, steps=prog.steps)
    try:
        g = api.grad(prog.fun, argnums)
        got = (jax.jit(g) if jit else g)(*prog.inputs)
    except Exception as e:  # noqa: BLE001
        return FuzzResult(-1, False, error=f"bpkit raised {type(e).__name__}: {e}",
                          steps=prog.steps, jaxpr=prog.jaxpr())
    worst, ok = 0.0, True
    for a, b in zip(got, want):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return FuzzResult(-1, False, error=f"shape/dtype {a.shape}/{a.dtype} vs "
                              f"{b.shape}/{b.dtype}", steps=prog.steps, jaxpr=prog.jaxpr())
        both_nan = np.isnan(a) & np.isnan(b)
        diff = np.where(both_nan, 0.0, np.abs(a - b))
        worst = max(worst, float(np.max(diff, initial=0.0)))
        scale = np.maximum(np.abs(b), 1.0)
        ok &= bool(np.all((diff <= rtol * scale) | both_nan)) and not np.any(np.isnan(diff))
    return FuzzResult(-1, ok, worst, None, prog.steps, "" if ok else prog.jaxpr())


def fuzz(n: int, seed: int = 0, jit: bool | None = None, progress: Callable | None = None,
         max_steps: int = 8) -> FuzzReport:
    """Run ``n`` random programs; ``jit=None`` alternates eager (even) and jitted (odd)."""
    start = time.perf_counter()
    results = []
    with float64_enabled():
        for i in range(n):
            prog = random_program(np.random.default_rng([seed, i]), max_steps)
            r = check_program(prog, jit=(i % 2 == 1) if jit is None else jit)
            r.index = i
            results.append(r)
            if progress is not None:
                progress(i, r)
    return FuzzReport(seed, results, time.perf_counter() - start)


__all__: list[Any] = ["random_program", "fuzz", "check_program", "Program", "FuzzReport",
                      "FuzzResult"]
