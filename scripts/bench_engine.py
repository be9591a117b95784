"""The engine alone: jitted value_and_grad under bpkit vs jax.grad on four plain-JAX models.

    python scripts/bench_engine.py [--repeats 20] [--models mlp cnn1d gru gpt] [--hlo]

Models: MLP 40-256-256-10 (batch 512); 1-D CNN on length-40 inputs, 3 conv layers (batch 256);
GRU(128) over 40 steps (batch 256); a small GPT (2 layers, d=64, context 64, batch 8). Both
engines' steps are compiled first, then timed interleaved (bpkit, jax, bpkit, jax, ...) so
that machine noise hits both alike; the table gives each one's median and the median of the
per-pair ratios bpkit/jax (below 1: bpkit is faster). ``--hlo`` also prints XLA's cost
analysis (flops, bytes accessed) of both compiled steps, to explain a difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bpkit


def _init(key, shape, scale=None):
    scale = scale if scale is not None else 1.0 / np.sqrt(shape[0] if len(shape) > 1 else 1)
    return jax.random.normal(key, shape, jnp.float32) * scale


def xent(logits, labels):
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], -1))


# --- models: (loss(params, batch), params, batch) ------------------------------------------------
def mlp(key):
    ks = jax.random.split(key, 5)
    sizes = [40, 256, 256, 10]
    params = [{"w": _init(ks[i], (a, b)), "b": jnp.zeros((b,))}
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    batch = (jax.random.normal(ks[3], (512, 40)), jax.random.randint(ks[4], (512,), 0, 10))

    def loss(params, batch):
        x, y = batch
        for i, layer in enumerate(params):
            x = x @ layer["w"] + layer["b"][None, :]
            x = jax.nn.relu(x) if i < len(params) - 1 else x
        return xent(x, y)
    return loss, params, batch


def cnn1d(key):
    ks = jax.random.split(key, 6)
    chans = [1, 32, 32, 32]
    params = {"convs": [_init(ks[i], (5, chans[i], chans[i + 1]), 1 / np.sqrt(5 * chans[i]))
                        for i in range(3)],
              "out": _init(ks[3], (32 * 5, 10))}
    batch = (jax.random.normal(ks[4], (256, 40, 1)), jax.random.randint(ks[5], (256,), 0, 10))

    def loss(params, batch):
        x, y = batch  # (B, L, C)
        for w in params["convs"]:
            x = lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
            x = jax.nn.relu(x)
            x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 1), (1, 2, 1), "VALID")
        return xent(x.reshape(x.shape[0], -1) @ params["out"], y)
    return loss, params, batch


def gru(key):
    ks = jax.random.split(key, 6)
    H, D = 128, 16
    params = {"wx": _init(ks[0], (D, 3 * H)), "wh": _init(ks[1], (H, 3 * H)),
              "b": jnp.zeros((3 * H,)), "out": _init(ks[2], (H, 10))}
    batch = (jax.random.normal(ks[3], (40, 256, D)), jax.random.randint(ks[4], (256,), 0, 10))

    def loss(params, batch):
        xs, y = batch

        def cell(h, x):
            gx = x @ params["wx"] + params["b"][None, :]
            gh = h @ params["wh"]
            z = jax.nn.sigmoid(gx[:, :H] + gh[:, :H])
            r = jax.nn.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
            n = jnp.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
            return (1 - z) * n + z * h, None
        h, _ = lax.scan(cell, jnp.zeros((xs.shape[1], H)), xs)
        return xent(h @ params["out"], y)
    return loss, params, batch


def gpt(key, n_layer=2, d=64, ctx=64, vocab=128, nh=4, batch=8, remat=lambda block: block):
    """``remat`` wraps each block, e.g. ``functools.partial(jax.checkpoint, policy=...)``."""
    ks = iter(jax.random.split(key, 8 + 4 * n_layer))
    params = {"wte": _init(next(ks), (vocab, d), 0.02), "wpe": _init(next(ks), (ctx, d), 0.02),
              "blocks": [{"ln1": jnp.ones((d,)), "ln2": jnp.ones((d,)),
                          "qkv": _init(next(ks), (d, 3 * d)), "proj": _init(next(ks), (d, d)),
                          "fc": _init(next(ks), (d, 4 * d)), "fc2": _init(next(ks), (4 * d, d))}
                         for _ in range(n_layer)],
              "lnf": jnp.ones((d,))}
    tokens = jax.random.randint(next(ks), (batch, ctx + 1), 0, vocab)
    batch = (tokens[:, :-1], tokens[:, 1:])

    def ln(x, g):
        mu = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
        return (x - mu) * lax.rsqrt(var + 1e-5) * g

    @remat
    def block(x, blk):
        B, T, _ = x.shape
        mask = jnp.tril(jnp.ones((T, T), bool))
        h = ln(x, blk["ln1"])
        q, k, v = jnp.split(h @ blk["qkv"], 3, axis=-1)
        q, k, v = (t.reshape(B, T, nh, d // nh).transpose(0, 2, 1, 3) for t in (q, k, v))
        att = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(d // nh)  # (B, nh, T, T)
        att = jax.nn.softmax(jnp.where(mask[None, None], att, -jnp.inf), -1)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
        x = x + y @ blk["proj"]
        return x + jax.nn.gelu(ln(x, blk["ln2"]) @ blk["fc"]) @ blk["fc2"]

    def loss(params, batch):
        idx, tgt = batch
        B, T = idx.shape
        x = params["wte"][idx] + params["wpe"][None, :T]  # (B, T, d)
        for blk in params["blocks"]:
            x = block(x, blk)
        logits = ln(x, params["lnf"]) @ params["wte"].T
        return xent(logits.reshape(B * T, vocab), tgt.reshape(B * T))
    return loss, params, batch


MODELS = {"mlp": mlp, "cnn1d": cnn1d, "gru": gru, "gpt": gpt}


def engine_steps(loss) -> dict:
    """The jitted ``value_and_grad`` of ``loss`` by each engine."""
    return {"bpkit": jax.jit(bpkit.value_and_grad(loss)),
            "jax": jax.jit(jax.value_and_grad(loss))}


def time_engines(steps: dict, params, batch, repeats: int) -> dict:
    """Warm every step up, check their gradients agree with ``steps["jax"]``, then time them
    interleaved (one round per repeat, so load on the machine hits all alike): ``<name>_ms``
    medians, ``<name>_ratio`` the median per-round ratio to jax (``ratio``: bpkit's), and
    ``max_grad_diff`` the largest absolute gradient difference from jax."""
    for step in steps.values():
        for _ in range(3):
            jax.block_until_ready(step(params, batch))
    grads = {name: jax.tree_util.tree_leaves(step(params, batch)[1])
             for name, step in steps.items()}
    err = max(float(jnp.max(jnp.abs(a - b))) for name in steps if name != "jax"
              for a, b in zip(grads[name], grads["jax"]))
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, batch))
            times[name].append(time.perf_counter() - t0)
    row = {"max_grad_diff": err}
    for name, ts in times.items():
        row[f"{name}_ms"] = 1e3 * statistics.median(ts)
        row[f"{name}_ratio"] = statistics.median(t / j for t, j in zip(ts, times["jax"]))
    row["ratio"] = row.get("bpkit_ratio")
    return row


def bench(name: str, repeats: int, hlo: bool) -> dict:
    loss, params, batch = MODELS[name](jax.random.key(0))
    steps = engine_steps(loss)
    row = {"model": name, **time_engines(steps, params, batch, repeats)}
    if hlo:
        for engine, step in steps.items():
            cost = step.lower(params, batch).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            row[f"{engine}_flops"] = float(cost.get("flops", float("nan")))
            row[f"{engine}_bytes"] = float(cost.get("bytes accessed", float("nan")))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="bpkit vs jax.grad: jitted value_and_grad")
    parser.add_argument("--repeats", type=int, default=20, help="timed pairs per model (>= 10)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--hlo", action="store_true", help="also print XLA cost analysis")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {args.repeats} timed pairs, "
          "medians")
    head = f"{'model':8} {'bpkit ms':>10} {'jax ms':>10} {'bpkit/jax':>10} {'max |dg|':>10}"
    if args.hlo:
        head += f" {'flops b/j':>10} {'bytes b/j':>10}"
    print(head)
    print("-" * len(head))
    for name in args.models:
        r = bench(name, max(args.repeats, 10), args.hlo)
        line = (f"{name:8} {r['bpkit_ms']:10.3f} {r['jax_ms']:10.3f} {r['ratio']:10.3f} "
                f"{r['max_grad_diff']:10.2e}")
        if args.hlo:
            line += (f" {r['bpkit_flops'] / r['jax_flops']:10.3f}"
                     f" {r['bpkit_bytes'] / r['jax_bytes']:10.3f}")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
