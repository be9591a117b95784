"""The PyTorch eager pass of the benchmark: bpkit's reference models (``bench_models()`` in
``bpkit/bench.py``) rebuilt in PyTorch with the same shapes, timed as full train steps.

Run as its own process, so that PyTorch and JAX never share threads or memory::

    python -m bpkit.bench_torch --json PATH [--models mlp gpt ...]   # PyTorch alone
    python -m bpkit.bench_torch --serve      # started by `bpkit bench --torch` (see ``serve``)

Each step is ``zero_grad -> forward -> mean softmax cross-entropy (integer labels) -> backward
-> Adam(lr=1e-3) step`` in float32 eager mode; the reported time is the median of ``repeats``
timed steps after ``warmup`` steps. ``torch.set_num_threads`` is left at PyTorch's default.

The models follow bpkit's structure; where PyTorch's idiomatic layer differs, the difference is
negligible for timing and listed here:

* cnn1d: ``Conv1d(k=5, stride 2, padding=2)`` gives the same lengths (40 -> 20 -> 10 -> 5) as
  JAX's 'SAME' padding (which pads 1 left, 2 right); channels-first (NCL/NCHW) layouts.
* gru / lstm: ``nn.GRU`` / ``nn.LSTM`` (PyTorch's fused recurrent kernels) carry a second bias
  vector (``b_hh``) that bpkit's cells do not have.
* gpt: attention through ``F.scaled_dot_product_attention(is_causal=True)`` (PyTorch's fused
  attention; bpkit's GPT uses its fused attention op too); GELU is the tanh approximation, as in
  bpkit; the head is untied, as in bpkit.
* initialisation is PyTorch's default (it does not change the work per step).

This module imports no JAX. The model names must match ``bpkit.bench.bench_models()``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

MODEL_NAMES = ("mlp", "cnn1d", "gru", "lstm", "gpt", "residual_mlp", "cnn2d")
ROW_KEYS = ("model", "torch_eager_step_ms")


def _build(name: str, torch, nn, F):
    """``(module, make_batch)`` for one reference model; ``make_batch(rng) -> (x, y)`` numpy
    arrays with the shapes of ``bpkit.bench.bench_models()`` (before any layout change)."""
    def classify(b, shape, classes=10):
        return lambda rng: (rng.standard_normal((b, *shape)).astype(np.float32),
                            rng.integers(0, classes, b).astype(np.int64))

    if name == "mlp":  # 40-256-256-10, batch 512
        net = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                            nn.Linear(256, 10))
        return net, classify(512, (40,))

    if name == "cnn1d":  # (B, 40) -> (B, 1, 40); 3 x [conv k5 s2 -> relu]; flatten; head
        class CNN1D(nn.Module):
            def __init__(self, length=40, channels=(32, 32, 32), k=5, classes=10):
                super().__init__()
                layers, c_in, n = [], 1, length
                for c in channels:
                    layers += [nn.Conv1d(c_in, c, k, stride=2, padding=k // 2), nn.ReLU()]
                    c_in, n = c, (n + 1) // 2
                self.body = nn.Sequential(*layers)
                self.head = nn.Linear(c_in * n, classes)

            def forward(self, x):  # (B, L)
                return self.head(self.body(x[:, None, :]).flatten(1))
        return CNN1D(), classify(512, (40,))

    if name in ("gru", "lstm"):  # (B, 40) -> (B, 40, 1) -> RNN(128) -> last h -> head
        cell = nn.GRU if name == "gru" else nn.LSTM

        class SeqClassifier(nn.Module):
            def __init__(self, hidden=128, classes=10):
                super().__init__()
                self.rnn = cell(1, hidden, batch_first=True)
                self.head = nn.Linear(hidden, classes)

            def forward(self, x):  # (B, T)
                out, _ = self.rnn(x[..., None])  # (B, T, H)
                return self.head(out[:, -1])
        return SeqClassifier(), classify(256, (40,))

    if name == "gpt":  # vocab 65, d 128, 4 layers, 4 heads, ctx 128, batch 16
        class Block(nn.Module):  # pre-LN (GPT-2): x + attn(ln_1 x); x + mlp(ln_2 x)
            def __init__(self, d, heads):
                super().__init__()
                self.heads = heads
                self.ln_1, self.ln_2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
                self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
                self.fc, self.fc_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

            def forward(self, x):  # (B, T, d)
                b, t, d = x.shape
                qkv = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, d // self.heads)
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
                x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
                h = F.gelu(self.fc(self.ln_2(x)), approximate="tanh")  # (B, T, 4d)
                return x + self.fc_proj(h)

        class GPT(nn.Module):
            def __init__(self, vocab=65, d=128, layers=4, heads=4, context=128):
                super().__init__()
                self.tok_emb = nn.Embedding(vocab, d)
                self.pos_emb = nn.Parameter(0.02 * torch.randn(context, d))
                self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
                self.ln_f = nn.LayerNorm(d, eps=1e-5)
                self.head = nn.Linear(d, vocab)

            def forward(self, tokens):  # (B, T) -> (B, T, V)
                x = self.tok_emb(tokens) + self.pos_emb[: tokens.shape[1]]
                return self.head(self.ln_f(self.blocks(x)))

        def tokens(rng, b=16, t=128, v=65):
            seq = rng.integers(0, v, (b, t + 1)).astype(np.int64)
            return seq[:, :-1].copy(), seq[:, 1:].copy()
        return GPT(), tokens

    if name == "residual_mlp":  # stem 40->64; 20 x [x + W relu(x) + b]; relu; head
        class ResidualMLP(nn.Module):
            def __init__(self, d_in=40, width=64, depth=20, classes=10):
                super().__init__()
                self.stem = nn.Linear(d_in, width)
                self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
                self.head = nn.Linear(width, classes)

            def forward(self, x):
                x = self.stem(x)
                for blk in self.blocks:
                    x = x + blk(F.relu(x))
                return self.head(F.relu(x))
        return ResidualMLP(), classify(512, (40,))

    if name == "cnn2d":  # (B, 28, 28, 1) -> NCHW; 2 x [conv 3x3 same -> relu -> maxpool 2]
        class CNN2D(nn.Module):
            def __init__(self, channels=(16, 32), classes=10):
                super().__init__()
                layers, c_in, n = [], 1, 28
                for c in channels:
                    layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
                    c_in, n = c, n // 2
                self.body = nn.Sequential(*layers)
                self.head = nn.Linear(c_in * n * n, classes)

            def forward(self, x):  # (B, H, W, C)
                return self.head(self.body(x.permute(0, 3, 1, 2)).flatten(1))
        return CNN2D(), classify(128, (28, 28, 1))

    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}.")


def make_step(name: str, seed: int = 0, device: str = "cpu"):
    """``(step, sync)``: one full train step of ``name`` (returns the loss) and the device
    synchronisation to call before reading a clock."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(seed)
    net, make_batch = _build(name, torch, nn, F)
    net = net.to(device=device, dtype=torch.float32).train()
    x, y = (torch.from_numpy(a).to(device) for a in make_batch(np.random.default_rng(seed)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss

    return step, sync


def time_steps(step, sync, n: int) -> list[float]:
    """Seconds of each of ``n`` steps."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return times


def bench_model(name: str, repeats: int = 10, warmup: int = 3, seed: int = 0,
                device: str = "cpu") -> dict:
    """``{"model", "torch_eager_step_ms"}``: the median full train step of ``name``."""
    step, sync = make_step(name, seed, device)
    time_steps(step, sync, warmup)
    times = time_steps(step, sync, repeats)
    return {"model": name, "torch_eager_step_ms": 1e3 * statistics.median(times)}


def serve(device: str = "cpu", warmup: int = 3) -> int:
    """Time steps on request, for ``bpkit bench --torch``, which alternates chunks of PyTorch
    steps with chunks of JAX steps so that both see the same machine (a shared VM's speed
    drifts by tens of percent over minutes). Protocol, one JSON object per line: first this
    process writes ``{"machine": {...}}``; then for each request ``{"model": NAME, "steps":
    N}`` read from stdin it runs 2 untimed steps, then answers ``{"times": [seconds, ...]}``
    of N timed ones (a model is built and warmed up on its first request). Ends at end of
    input."""
    import torch
    print(json.dumps({"machine": _machine(torch, device)}), flush=True)
    steps = {}
    for line in sys.stdin:
        request = json.loads(line)
        name = request["model"]
        if name not in steps:
            steps[name] = make_step(name, device=device)
            time_steps(*steps[name], warmup)
        time_steps(*steps[name], 2)  # untimed: warm the caches again after the JAX chunk
        print(json.dumps({"times": time_steps(*steps[name], int(request["steps"]))}),
              flush=True)
    return 0


def _machine(torch, device: str) -> dict:
    from bpkit.host_memory import status
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
            "host_memory": status(),
            "processor": platform.processor() or platform.machine()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpkit.bench_torch",
                                description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES,
                   metavar="MODEL", help=f"models to run (default all: {' '.join(MODEL_NAMES)})")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per model (>= 10)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--host-memory", choices=["reuse", "system"], default="reuse",
                   help="reuse: keep freed host memory (bpkit/host_memory.py), as bpkit bench "
                        "does for JAX; system: glibc's defaults")
    p.add_argument("--serve", action="store_true",
                   help="answer timing requests on stdin (used by `bpkit bench --torch`)")
    args = p.parse_args(argv)
    if args.repeats < 10:
        p.error("--repeats must be at least 10")
    if args.host_memory == "reuse":
        from bpkit.host_memory import reuse_host_memory
        reuse_host_memory()  # before PyTorch starts its threads
    try:
        import torch
    except ImportError:
        print("bpkit.bench_torch: needs PyTorch; install the CPU build with "
              "`pip install torch==2.13.0`.", file=sys.stderr)
        return 2
    if args.serve:
        return serve(args.device)
    machine = _machine(torch, args.device)
    print(f"torch {machine['torch']}, {machine['threads']} threads, device {args.device}",
          flush=True)
    rows = []
    for name in args.models:
        rows.append(bench_model(name, repeats=args.repeats, device=args.device))
        print(f"{name}: torch eager step {rows[-1]['torch_eager_step_ms']:.2f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
