"""Cost of backward-signal diagnostics on the MLP (mnist1d_mlp) and GPT (charlm_gpt) steps.

For each config: the jitted train step alone vs the diagnostics function (backward_signals on
the same loss, params, batch and key), timed interleaved on the same batch, medians of
``--repeats`` runs. Reported: signals_time / step_time ("raw": a step that also logs), and
(signals_time / every) / step_time ("overhead when on", for diagnostics.every = 10). With
diagnostics off the step function is unchanged, so the overhead is zero.

    python scripts/bench_diagnostics.py [--repeats 30] [--every 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

from bpkit.config import load_config
from bpkit.data import train_batch
from bpkit.train import loop

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"mlp": ("mnist1d_mlp.yaml", []),
         "gpt": ("charlm_gpt.yaml", ["data.max_chars=200000"])}


def _time(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def bench(name: str, repeats: int, every: int) -> dict:
    config, extra = CASES[name]
    cfg = load_config(os.path.join(HERE, "configs", config),
                      extra + [f"diagnostics.every={every}"])
    ds, task, tx, schedule = loop.build(cfg)
    state = loop.init_state(cfg, task, tx)
    step, _ = loop.make_steps(cfg, task, tx, schedule)
    signals = loop.make_signals(cfg, task)
    batch = jax.device_put(train_batch(ds, 0, cfg.data.batch_size, cfg.run.seed))
    key = state.step_key()
    holder = [state]

    def run_step():
        holder[0], m = step(holder[0], batch)  # the state is donated: thread it through
        return m

    def run_signals():
        return signals(holder[0].params, batch, key)

    for _ in range(3):  # compile and warm up
        run_step(), run_signals()
    t_step, t_sig = [], []
    for _ in range(repeats):
        t_step.append(_time(run_step))
        t_sig.append(_time(run_signals))
    s, g = statistics.median(t_step), statistics.median(t_sig)
    return {"case": name, "step_ms": 1e3 * s, "signals_ms": 1e3 * g, "raw": g / s,
            "when_on": (g / every) / s, "every": every}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--cases", default="mlp,gpt")
    a = p.parse_args()
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); medians of "
          f"{a.repeats} interleaved runs")
    print(f"{'case':<5} {'step ms':>9} {'signals ms':>11} {'signals/step':>13} "
          f"{'overhead every=' + str(a.every):>20}")
    for name in a.cases.split(","):
        r = bench(name, a.repeats, a.every)
        print(f"{r['case']:<5} {r['step_ms']:>9.2f} {r['signals_ms']:>11.2f} {r['raw']:>12.0%} "
              f"{r['when_on']:>19.1%}")
    print("diagnostics off: 0% (the jitted step is unchanged; "
          "tests/train/test_diagnostics_train.py checks its HLO)")


if __name__ == "__main__":
    main()
