"""Checkpoint policies: bpkit vs jax.grad on a GPT whose blocks are ``jax.checkpoint``-ed.

    python scripts/bench_remat.py [--repeats 20] [--policies none nothing dots_no_batch ...]

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

import jax

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="bpkit vs jax.grad under checkpoint policies")
    parser.add_argument("--repeats", type=int, default=20, help="timed pairs per policy (>= 10)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    args = parser.parse_args(argv)
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
