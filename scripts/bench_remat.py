"""Checkpoint policies and ``remat="auto"``: bpkit vs jax.grad, time and XLA temporary memory.

    python scripts/bench_remat.py [--repeats 20] [--policies none nothing dots_no_batch ...]
    python scripts/bench_remat.py --auto [--repeats 20]
    python scripts/bench_remat.py --fit

``--auto``: on the GPT below (no jax.checkpoint) and a deep residual MLP (16 layers, d=512,
batch 256, ``h + gelu(tanh(h W + b))``), jax.grad vs bpkit's default vs ``remat="auto"`` and
``remat="auto"`` at three budgets (the cheap plan's saved bytes, one byte less, and 0: each
forces the next recomputable set). Every step is compiled, its gradients checked against
jax.grad's, and all are timed interleaved in one process. Memory falls only where XLA keeps
a recomputation apart from the forward pass (JAX 0.12's XLA; 0.10's merges it back, and
jax.checkpoint's too). ``--fit``: the largest batch each setting fits into the temporaries
jax.grad needs at the benchmark's batch (compiled memory only, nothing is run).

The GPT is ``bench_engine.gpt`` (plain JAX, pre-LN, 4 layers, d=128, 4 heads, context 128,
batch 16), each block wrapped in ``jax.checkpoint(policy=...)`` (``none``: no checkpoint). For
each policy both engines' jitted ``value_and_grad`` are compiled, checked against each other,
then timed interleaved (bpkit, jax, bpkit, ...) in one process; the table gives medians, the
median of the per-pair ratios bpkit/jax, and XLA's temporary memory of each compiled step
(``compiled.memory_analysis().temp_size_in_bytes``). Ratios below 1: bpkit faster / smaller.
"""
from __future__ import annotations

import argparse
import functools
import sys
import warnings

import jax

import bpkit

from bench_engine import engine_steps, gpt, time_engines

CP = jax.checkpoint_policies
POLICIES = {
    "none": None,  # no jax.checkpoint at all
    "nothing": CP.nothing_saveable,
    "dots_no_batch": CP.dots_with_no_batch_dims_saveable,
    "dots": CP.dots_saveable,
    "everything": CP.everything_saveable,
}


def bench(policy_name: str, repeats: int) -> dict:
    policy = POLICIES[policy_name]
    remat = (lambda block: block) if policy_name == "none" else functools.partial(
        jax.checkpoint, policy=policy)
    loss, params, batch = gpt(jax.random.key(0), n_layer=4, d=128, ctx=128, batch=16,
                              remat=remat)
    steps = engine_steps(loss)
    temp_mb = {engine: step.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
               / 2 ** 20 for engine, step in steps.items()}
    return {"policy": policy_name, **time_engines(steps, params, batch, repeats),
            "bpkit_mb": temp_mb["bpkit"], "jax_mb": temp_mb["jax"]}


def residual_mlp(key, layers=16, d=512, batch=256):
    ks = jax.random.split(key, layers + 1)
    params = [(jax.random.normal(ks[i], (d, d)) / d ** 0.5, jax.numpy.zeros(d))
              for i in range(layers)]

    def loss(params, x):
        h = x
        for w, b in params:
            h = h + jax.nn.gelu(jax.numpy.tanh(h @ w + b))
        return jax.numpy.mean(h ** 2)
    return loss, params, jax.random.normal(ks[-1], (batch, d))


def bench_auto(model: str, repeats: int) -> list[dict]:
    """One row per setting: time (ms, ratio to jax.grad) and temp memory (MiB, ratio)."""
    from bpkit.engine import core, remat as remat_plan
    loss, params, batch = (gpt(jax.random.key(0), n_layer=4, d=128, ctx=128, batch=16)
                           if model == "gpt" else residual_mlp(jax.random.key(0)))
    flat, tree = jax.tree_util.tree_flatten(((params, batch), {}))
    traced = core.trace(loss, flat, tree)
    active = [jax.numpy.issubdtype(x.dtype, jax.numpy.floating) for x in flat]
    cheap = remat_plan.plan_for(traced.jaxpr, traced.consts, flat, active, None, (0,))
    settings = {"jax": None, "bpkit": {}, "auto": {"remat": "auto"}}
    for label, budget in (("its saved bytes", cheap.saved_bytes),
                          ("1 byte less", cheap.saved_bytes - 1), ("0", 0)):
        settings[f"auto, budget {label}"] = {"remat": "auto", "remat_budget_bytes": budget}
    steps = {name: jax.jit(jax.value_and_grad(loss) if kw is None
                           else bpkit.value_and_grad(loss, argnums=0, **kw))
             for name, kw in settings.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # budget 0 cannot be met: the smallest plan is used
        temp = {name: step.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
                / 2 ** 20 for name, step in steps.items()}
        timing = time_engines(steps, params, batch, repeats)
    return [{"model": model, "setting": name, "ms": timing[f"{name}_ms"],
             "time_vs_jax": timing[f"{name}_ratio"],
             "time_vs_bpkit": timing[f"{name}_ms"] / timing["bpkit_ms"],
             "temp_mb": temp[name], "temp_vs_jax": temp[name] / temp["jax"],
             "max_grad_diff": timing["max_grad_diff"], "plan_mb": cheap.saved_bytes / 2 ** 20}
            for name in steps]


FIT_SETTINGS = {"jax": None, "bpkit": {}, "auto": {"remat": "auto"},
                "auto, budget 0": {"remat": "auto", "remat_budget_bytes": 0}}


def _temp_bytes(model: str, batch: int, setting) -> int:
    loss, params, data = (gpt(jax.random.key(0), n_layer=4, d=128, ctx=128, batch=batch)
                          if model == "gpt" else residual_mlp(jax.random.key(0), batch=batch))
    step = jax.jit(jax.value_and_grad(loss) if setting is None
                   else bpkit.value_and_grad(loss, argnums=0, **setting))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return step.lower(params, data).compile().memory_analysis().temp_size_in_bytes


def largest_batch(model: str, setting, limit: int, unit: int) -> int:
    """The largest multiple of ``unit`` whose compiled temporaries fit in ``limit`` bytes
    (doubling, then bisection; memory grows with the batch)."""
    lo, hi = 0, unit
    while _temp_bytes(model, hi, setting) <= limit:
        lo, hi = hi, 2 * hi
    while hi - lo > unit:
        mid = (lo + hi) // (2 * unit) * unit
        lo, hi = (mid, hi) if _temp_bytes(model, mid, setting) <= limit else (lo, mid)
    return lo


def main_fit() -> int:
    """The largest batch whose step fits the temporaries jax.grad needs at the benchmark's
    batch (GPT: 16 sequences of 128; residual MLP: 256 rows), per setting."""
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; memory: XLA temporaries\n")
    print("| model | memory (jax.grad at the benchmark batch) | setting | largest batch |")
    print("|---|---|---|---|")
    for model, batch, unit in (("gpt", 16, 2), ("residual_mlp", 256, 32)):
        limit = _temp_bytes(model, batch, None)
        for name, setting in FIT_SETTINGS.items():
            print(f"| {model} | {limit / 2 ** 20:.1f} MiB | {name} "
                  f"| {largest_batch(model, setting, limit, unit)} |", flush=True)
    return 0


def main_auto(repeats: int) -> int:
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {repeats} timed rounds, "
          "medians\n")
    print("| model | setting | ms | time / jax.grad | time / bpkit default | temp MiB "
          "| temp / jax.grad |")
    print("|---|---|---|---|---|---|---|")
    for model in ("gpt", "residual_mlp"):
        rows = bench_auto(model, repeats)
        for r in rows:
            print(f"| {r['model']} | {r['setting']} | {r['ms']:.1f} | {r['time_vs_jax']:.2f} "
                  f"| {r['time_vs_bpkit']:.2f} | {r['temp_mb']:.1f} | {r['temp_vs_jax']:.2f} |",
                  flush=True)
        print(f"(auto's plan saves {rows[0]['plan_mb']:.2f} MiB; largest gradient difference "
              f"from jax.grad: {rows[0]['max_grad_diff']:.1e})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="bpkit vs jax.grad under checkpoint policies")
    parser.add_argument("--repeats", type=int, default=20, help="timed pairs per policy (>= 10)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--auto", action="store_true",
                        help="remat='auto' and its budgets on the GPT and a deep residual MLP")
    parser.add_argument("--fit", action="store_true",
                        help="the largest batch that fits jax.grad's memory, per setting")
    args = parser.parse_args(argv)
    if args.fit:
        return main_fit()
    if args.auto:
        return main_auto(max(args.repeats, 10))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; GPT 4 layers, d=128, ctx 128, "
          f"batch 16; {max(args.repeats, 10)} timed pairs, medians\n")
    print("| policy | bpkit ms | jax ms | step | bpkit temp MB | jax temp MB | memory "
          "| max abs grad diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.policies:
        r = bench(name, max(args.repeats, 10))
        print(f"| {name} | {r['bpkit_ms']:.2f} | {r['jax_ms']:.2f} | {r['ratio']:.2f} "
              f"| {r['bpkit_mb']:.2f} | {r['jax_mb']:.2f} | {r['bpkit_mb'] / r['jax_mb']:.2f} "
              f"| {r['max_grad_diff']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
