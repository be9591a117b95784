"""The benchmark harness: bpkit's train step against jax.grad's, side by side in one process.

For each reference model it builds the same jitted train step (gradient + optax adam update)
twice — ``engine="bpkit"`` and ``engine="jax"`` — and measures

* the step time: median of ``repeats`` timed steps after warm-up, the two engines interleaved
  step by step so that machine noise hits both alike;
* the compile time: trace + lower + compile of the step;
* XLA's temporary memory of the compiled step (``compiled.memory_analysis()``);
* for the MLP and the GPT, the achieved FLOP/s (XLA's cost analysis over the step time) as a
  fraction of the machine's measured matmul peak (the best of 1024² and 2048² float32
  products, read before and after the models).

With ``--torch`` (PyTorch installed), ``bpkit.bench_torch`` also times the same models in
PyTorch eager, in a separate process that this one drives: chunks of PyTorch steps alternate
with chunks of JAX steps (``TorchServer``), so all three see the same machine; a second table
shows bpkit / torch.

Ratios are bpkit / jax: below 1 means bpkit is faster or smaller. Absolute times depend on the
machine; only the ratios are comparable across machines.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bpkit import host_memory, models
from bpkit.engine import compat
from bpkit.nn import losses
from bpkit.train import TrainState, make_train_step
from bpkit.train.progress import xla_flops

ROW_KEYS = ("model", "bpkit_step_ms", "jax_step_ms", "step_ratio", "bpkit_compile_s",
            "jax_compile_s", "compile_ratio", "bpkit_temp_bytes", "jax_temp_bytes",
            "memory_ratio")


class BenchModel(NamedTuple):
    name: str
    model: models.Model
    batch: Callable[[np.random.Generator], tuple]  # rng -> (x, y)
    sequence_labels: bool = False  # language model: labels per position


def bench_models() -> dict[str, BenchModel]:
    """The reference models at the sizes of issue 6 (MNIST-1D shapes, char-level GPT)."""
    def classify(b, shape, classes=10, dtype=np.float32):
        return lambda rng: (rng.standard_normal((b, *shape)).astype(dtype),
                            rng.integers(0, classes, b).astype(np.int32))

    def tokens(b, t, v):
        def make(rng):
            seq = rng.integers(0, v, (b, t + 1)).astype(np.int32)
            return seq[:, :-1], seq[:, 1:]
        return make

    return {m.name: m for m in [
        BenchModel("mlp", models.mlp(40, (256, 256), 10), classify(512, (40,))),
        BenchModel("cnn1d", models.cnn1d(40, (32, 32, 32), 5, 10), classify(512, (40,))),
        BenchModel("gru", models.gru_classifier(1, 128, 10), classify(256, (40,))),
        BenchModel("lstm", models.lstm_classifier(1, 128, 10), classify(256, (40,))),
        BenchModel("gpt", models.gpt(65, 128, 4, 4, 128), tokens(16, 128, 65), True),
        BenchModel("residual_mlp", models.residual_mlp(40, 64, 20, 10), classify(512, (40,))),
        BenchModel("cnn2d", models.cnn2d((28, 28, 1), (16, 32), 10), classify(128, (28, 28, 1))),
    ]}


def _loss_fn(bm: BenchModel):
    def loss_fn(params, batch, key):
        x, y = batch
        logits = bm.model.apply(params, x, key=key, train=True)
        return jnp.mean(losses.softmax_cross_entropy(logits, y))
    return loss_fn


def _time(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def matmul_peak_flops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 10) -> float:
    """Measured float32 matmul FLOP/s of this machine through XLA: the best of ``repeats``
    square ``n x n`` products for each ``n`` in ``sizes`` (one size and few repeats
    under-read the peak by up to a third on a shared VM)."""
    f = jax.jit(lambda a, b: a @ b)
    best = 0.0
    for n in sizes:
        a = jnp.ones((n, n), jnp.float32)
        jax.block_until_ready(f(a, a))
        best = max(best, 2 * n ** 3 / min(_time(lambda: f(a, a)) for _ in range(repeats)))
    return best


class TorchServer:
    """A ``python -m bpkit.bench_torch --serve`` process that times PyTorch steps on request
    (see ``bpkit.bench_torch.serve``). Start it with ``start()``; ``None`` if it fails."""

    def __init__(self, proc: subprocess.Popen, machine: dict):
        self.proc, self.machine = proc, machine

    @classmethod
    def start(cls, host_memory: str = "reuse") -> "TorchServer | None":
        root = str(Path(__file__).resolve().parent.parent)  # so that the child finds this bpkit
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen([sys.executable, "-m", "bpkit.bench_torch", "--serve",
                                 "--host-memory", host_memory],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            print(f"bpkit bench: the PyTorch process failed (exit status {proc.returncode}).",
                  file=sys.stderr)
            return None
        return cls(proc, json.loads(line)["machine"])

    def time_steps(self, model: str, steps: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"model": model, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch process stopped while timing {model}")
        return json.loads(line)["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def bench_model(bm: BenchModel, repeats: int = 10, warmup: int = 3, seed: int = 0,
                torch: TorchServer | None = None, remat: str | None = None
                ) -> tuple[dict, float | None, float | None]:
    """``(row, flops_per_step, torch_ms)``: the JSON row for ``bm`` (exactly ``ROW_KEYS``),
    XLA's FLOP count of one step (``None`` where the backend gives no cost analysis) and, with
    a ``torch`` server, PyTorch eager's median step time (else ``None``). ``remat``: bpkit's
    setting (``bpkit.grad``'s ``remat``; jax.grad runs without)."""
    rng = np.random.default_rng(seed)
    batch = tuple(jnp.asarray(a) for a in bm.batch(rng))
    tx = optax.adam(1e-3)
    params = bm.model.init(jax.random.PRNGKey(seed))
    row: dict = {"model": bm.name}
    steps, states = {}, {}
    for engine in ("bpkit", "jax"):
        step = make_train_step(_loss_fn(bm), tx, engine=engine, donate=False,
                               remat=remat if engine == "bpkit" else None)
        state = TrainState.create(jax.tree_util.tree_map(jnp.array, params), tx, seed=seed)
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
        compiled = lowered.compile()
        row[f"{engine}_compile_s"] = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        row[f"{engine}_temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0)) if mem else 0
        if engine == "jax":
            flops = xla_flops(compiled)
        steps[engine], states[engine] = compiled, state
    for _ in range(warmup):
        for engine in steps:
            states[engine] = steps[engine](states[engine], batch)[0]
    times: dict[str, list[float]] = {"bpkit": [], "jax": [], "torch": []}
    # With PyTorch: 5 rounds, each a chunk of PyTorch steps then a chunk of JAX steps. Each
    # chunk starts with untimed steps (caches and worker threads warm again after the other
    # side ran). No pause between chunks: after ~0.1 s idle, worker threads park and the next
    # steps run up to 1.8x slower (measured on the MLP).
    rounds = 5 if torch is not None else 1
    per_round = -(-repeats // rounds)
    for _ in range(rounds):
        if torch is not None:
            times["torch"] += torch.time_steps(bm.name, per_round)
            for _ in range(2):
                for engine in steps:
                    states[engine] = steps[engine](states[engine], batch)[0]
            jax.block_until_ready(states)
        for _ in range(per_round):
            for engine in steps:  # interleaved: both engines see the same machine noise
                t = time.perf_counter()
                states[engine], metrics = steps[engine](states[engine], batch)
                jax.block_until_ready(metrics["loss"])
                times[engine].append(time.perf_counter() - t)
    for engine in steps:
        row[f"{engine}_step_ms"] = 1e3 * statistics.median(times[engine])
    row["step_ratio"] = row["bpkit_step_ms"] / row["jax_step_ms"]
    row["compile_ratio"] = row["bpkit_compile_s"] / row["jax_compile_s"]
    row["memory_ratio"] = (row["bpkit_temp_bytes"] / row["jax_temp_bytes"]
                           if row["jax_temp_bytes"] else float("nan"))
    torch_ms = 1e3 * statistics.median(times["torch"]) if times["torch"] else None
    return {k: row[k] for k in ROW_KEYS}, flops, torch_ms


def format_table(rows: list[dict]) -> str:
    head = ["model", "bpkit ms", "jax ms", "step", "bpkit comp s", "jax comp s", "compile",
            "bpkit temp MB", "jax temp MB", "memory"]
    lines = [head]
    for r in rows:
        lines.append([r["model"], f"{r['bpkit_step_ms']:.2f}", f"{r['jax_step_ms']:.2f}",
                      f"{r['step_ratio']:.2f}", f"{r['bpkit_compile_s']:.2f}",
                      f"{r['jax_compile_s']:.2f}", f"{r['compile_ratio']:.2f}",
                      f"{r['bpkit_temp_bytes'] / 2**20:.2f}", f"{r['jax_temp_bytes'] / 2**20:.2f}",
                      f"{r['memory_ratio']:.2f}"])
    w = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(l)) + " |" for l in lines]
    out.insert(1, "|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(out)


TORCH_ROW_KEYS = ("model", "torch_eager_step_ms", "bpkit_step_ms", "bpkit_over_torch")


def compare_torch(rows: list[dict], torch_rows: list[dict]) -> list[dict]:
    """Rows ``TORCH_ROW_KEYS``: bpkit's step time over PyTorch eager's, per model in both."""
    torch_ms = {r["model"]: r["torch_eager_step_ms"] for r in torch_rows}
    return [{"model": r["model"], "torch_eager_step_ms": torch_ms[r["model"]],
             "bpkit_step_ms": r["bpkit_step_ms"],
             "bpkit_over_torch": r["bpkit_step_ms"] / torch_ms[r["model"]]}
            for r in rows if r["model"] in torch_ms]


def _markdown(lines: list[list[str]]) -> str:
    w = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    out = ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(l)) + " |" for l in lines]
    out.insert(1, "|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(out)


def format_torch_table(rows: list[dict]) -> str:
    lines = [["model", "bpkit ms", "torch eager ms", "bpkit/torch"]]
    for r in rows:
        lines.append([r["model"], f"{r['bpkit_step_ms']:.2f}", f"{r['torch_eager_step_ms']:.2f}",
                      f"{r['bpkit_over_torch']:.2f}"])
    return _markdown(lines)


def main(argv: list[str] | None = None) -> int:
    all_models = bench_models()
    p = argparse.ArgumentParser(prog="bpkit bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    p.add_argument("--models", nargs="+", default=list(all_models), choices=list(all_models),
                   metavar="MODEL", help=f"models to run (default all: {' '.join(all_models)})")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per engine (>= 10)")
    p.add_argument("--torch", action="store_true",
                   help="also time PyTorch eager (needs `pip install torch==2.13.0`)")
    p.add_argument("--remat", choices=["none", "auto"], default="none",
                   help="bpkit's remat setting (bpkit.grad's remat=; default none)")
    p.add_argument("--host-memory", choices=["reuse", "system"], default="reuse",
                   help="reuse: keep freed host memory, in this process and PyTorch's, as "
                        "bpkit train does (bpkit/host_memory.py); system: glibc's defaults")
    args = p.parse_args(argv)
    if args.repeats < 10:
        p.error("--repeats must be at least 10")
    if args.host_memory == "reuse":
        host_memory.reuse_host_memory(quiet=True)  # before JAX starts its backend
    torch = None
    if args.torch:
        if importlib.util.find_spec("torch") is None:  # not imported here: torch runs apart
            print("bpkit bench: --torch needs PyTorch; install the CPU build with "
                  "`pip install torch==2.13.0`.", file=sys.stderr)
            return 2
        torch = TorchServer.start(args.host_memory)
        if torch is None:
            return 1
    try:
        return _run(args, all_models, torch)
    finally:
        if torch is not None:
            torch.close()


def _run(args, all_models: dict, torch: TorchServer | None) -> int:
    peak = matmul_peak_flops()
    options = compat.step_compiler_options(jax.default_backend())  # what make_train_step uses
    print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), jax {jax.__version__}; float32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s; host memory {host_memory.status()}; step compiler options "
          f"{options or 'XLA defaults'}", flush=True)
    rows, step_flops, torch_rows = [], {}, []
    for name in args.models:
        row, flops, torch_ms = bench_model(all_models[name], repeats=args.repeats, torch=torch,
                                           remat=None if args.remat == "none" else args.remat)
        rows.append(row)
        if torch_ms is not None:
            torch_rows.append({"model": name, "torch_eager_step_ms": torch_ms})
        if flops and name in ("mlp", "gpt"):
            step_flops[name] = flops
        print(f"{name}: step ratio {row['step_ratio']:.2f} "
              f"({row['bpkit_step_ms']:.2f} vs {row['jax_step_ms']:.2f} ms), compile ratio "
              f"{row['compile_ratio']:.2f}, memory ratio {row['memory_ratio']:.2f}", flush=True)
    peak = max(peak, matmul_peak_flops())  # again after the models: the best of both reads
    achieved = {}
    for row in rows:
        if row["model"] in step_flops:
            achieved[row["model"]] = {
                engine: step_flops[row["model"]] / (row[f"{engine}_step_ms"] / 1e3) / peak
                for engine in ("bpkit", "jax")}
            print(f"{row['model']}: {100 * achieved[row['model']]['bpkit']:.0f}% (bpkit) / "
                  f"{100 * achieved[row['model']]['jax']:.0f}% (jax) of the matmul peak "
                  f"({peak / 1e9:.1f} GFLOP/s, best read before and after the models)")
    print(format_table(rows))
    machine = {"platform": jax.devices()[0].platform, "device_count": jax.device_count(),
               "jax": jax.__version__, "matmul_peak_flops": peak, "bpkit_remat": args.remat,
               "host_memory": host_memory.status(),
               "compiler_options": options}
    out = {"machine": machine, "rows": rows, "peak_fraction": achieved}
    if torch is not None:
        out["torch"] = compare_torch(rows, torch_rows)
        machine["torch"] = torch.machine.get("torch")
        machine["torch_threads"] = torch.machine.get("threads")
        print(f"\nPyTorch {torch.machine.get('torch')} eager ({torch.machine.get('threads')} "
              f"threads, separate process, timed in chunks alternating with JAX's) vs bpkit:")
        print(format_torch_table(out["torch"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
