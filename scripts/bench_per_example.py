"""Per-example gradient norms: bpkit's ghost norms against vmap(grad), in one process.

    python scripts/bench_per_example.py [--reps 20] [--models mlp,cnn1d,gpt] [--batch N]
                                        [--json out.json]

For each reference model (the sizes of ``bpkit.bench.bench_models``) and its mean
cross-entropy loss, four jitted functions of ``(params, batch)``:

* ``value_and_grad``: one ordinary value and gradient by bpkit (the baseline, 1.00);
* ``ghost norms``: ``bpkit.per_example_grad_norms`` (one forward and backward pass; per-example
  norms from each layer's activations and output cotangents);
* ``vmap(grad) norms``: the norms of ``jax.vmap(bpkit.grad)`` over one-example batches
  (materialises B gradients), and the same with ``jax.grad`` as a reference;
* ``DP-SGD step``: ``bpkit.per_example.clipped_value_and_grad`` (norms, then a second backward
  pass seeded with the clip factors), against the baseline.

Times are medians of interleaved runs (all functions run in turn, so machine noise hits each
alike; at least 2 s of baseline runs per model); memory is XLA's scratch memory of each compiled function
(``memory_analysis().temp_size_in_bytes``). Ratios are against value_and_grad.
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
from bpkit.bench import bench_models
from bpkit.nn import losses
from bpkit.per_example import clipped_value_and_grad, per_example_grad_norms


def loss_for(bm):
    def loss(params, batch):
        x, y = batch
        return jnp.mean(losses.softmax_cross_entropy(bm.model.apply(params, x), y))
    return loss


def vmap_norms(grad):
    def make(loss):
        def norms(params, batch):
            one = lambda p, ex: loss(p, jax.tree_util.tree_map(lambda a: a[None], ex))  # noqa
            g = jax.vmap(grad(one), in_axes=(None, 0))(params, batch)
            sq = sum(jnp.sum(jnp.reshape(a * a, (a.shape[0], -1)), axis=1)
                     for a in jax.tree_util.tree_leaves(g))
            return jnp.sqrt(sq)
        return norms
    return make


def functions(loss, clip: float):
    return {
        "value_and_grad": bpkit.value_and_grad(loss),
        "ghost norms": lambda p, b: per_example_grad_norms(loss)(p, b).norms,
        "vmap(bpkit.grad) norms": vmap_norms(bpkit.grad)(loss),
        "vmap(jax.grad) norms": vmap_norms(jax.grad)(loss),
        "DP-SGD step (clipped grad)": clipped_value_and_grad(loss, clip),
    }


def temp_mib(compiled) -> float:
    stats = compiled.memory_analysis()
    return stats.temp_size_in_bytes / 2**20 if stats is not None else float("nan")


def bench(name: str, bm, reps: int, batch_size: int | None, min_seconds: float = 2.0
          ) -> list[dict]:
    rng = np.random.default_rng(0)
    batch = tuple(jnp.asarray(a) for a in bm.batch(rng))
    if batch_size:
        batch = tuple(a[:batch_size] for a in batch)
    params = bm.model.init(jax.random.PRNGKey(0))
    loss = loss_for(bm)
    compiled, rows = {}, {}
    for fname, fn in functions(loss, clip=1.0).items():
        t0 = time.perf_counter()
        c = jax.jit(fn).lower(params, batch).compile()
        compiled[fname] = c
        rows[fname] = {"model": name, "function": fname, "batch": int(batch[0].shape[0]),
                       "compile_s": time.perf_counter() - t0, "temp_mib": temp_mib(c),
                       "times": []}
    ghost = compiled["ghost norms"](params, batch)
    ref = compiled["vmap(jax.grad) norms"](params, batch)
    err = float(jnp.max(jnp.abs(ghost - ref) / ref))
    t = time.perf_counter()
    jax.block_until_ready(compiled["value_and_grad"](params, batch))
    reps = max(reps, int(min_seconds / max(time.perf_counter() - t, 1e-6)))  # fast models: more
    # Two groups, each interleaved with its own baseline runs: a 200 ms vmap run just before
    # a 5 ms step slows that step (measured up to 3x on the MLP), so the cheap functions are
    # not timed between the expensive ones.
    groups = [["value_and_grad", "ghost norms", "DP-SGD step (clipped grad)"],
              ["value_and_grad", "vmap(bpkit.grad) norms", "vmap(jax.grad) norms"]]
    out = []
    for g, names in enumerate(groups):
        times = {n: [] for n in names}
        for _ in range(2):
            for n in names:
                jax.block_until_ready(compiled[n](params, batch))
        for _ in range(reps if g == 0 else max(3, reps // 10)):
            for n in names:
                t = time.perf_counter()
                jax.block_until_ready(compiled[n](params, batch))
                times[n].append(time.perf_counter() - t)
        base_ms = 1e3 * statistics.median(times["value_and_grad"])
        for n in names[(1 if g else 0):]:
            r = dict(rows[n])
            r.pop("times")
            ms = 1e3 * statistics.median(times[n])
            base_mem = rows["value_and_grad"]["temp_mib"]
            r.update(ms=ms, time_ratio=ms / base_ms, reps=len(times[n]),
                     memory_ratio=r["temp_mib"] / base_mem if base_mem else None,
                     max_rel_err_vs_vmap=err)
            out.append(r)
    return out


def format_table(rows: list[dict]) -> str:
    head = ["model (batch)", "function", "ms", "time ×", "temp MiB", "memory ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mem = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        lines.append(f"| {r['model']} ({r['batch']}) | {r['function']} | {r['ms']:.2f} | "
                     f"{r['time_ratio']:.2f} | {r['temp_mib']:.2f} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--models", default="mlp,cnn1d,gpt")
    p.add_argument("--batch", type=int, default=None, help="use the first N examples")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    models = bench_models()
    rows = []
    for name in args.models.split(","):
        rows += bench(name, models[name], args.reps, args.batch)
        print(format_table([r for r in rows if r["model"] == name]), flush=True)
        print(f"  ghost vs vmap(jax.grad) norms: max relative difference "
              f"{rows[-1]['max_rel_err_vs_vmap']:.1e}", flush=True)
    print(f"\n{jax.devices()[0].platform}, jax {jax.__version__}\n" + format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
