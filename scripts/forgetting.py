"""Fine-tuning and forgetting: a char GPT pre-trained on Python source (corpus A) is
fine-tuned on English prose (the standard library's docstrings, corpus B) four ways, and each
result is evaluated on the held-out text of both corpora.

    python scripts/forgetting.py                        # pre-trains runs/charlm_gpt if needed
    python scripts/forgetting.py --out runs/forgetting --steps 200

Rows: full fine-tuning at a low (3e-4) and a high (3e-3) learning rate, LoRA (rank 4, the base
frozen) and full fine-tuning at the high rate with an L2 pull toward the pre-trained weights
(``--l2-pull``: one row per strength).
Forgetting = loss on A after - before; gain = loss on B before - after (nats per character).
Writes ``<out>/forgetting.md`` (the table), ``forgetting.json`` and ``forgetting.png``
(forgetting against gain). The LoRA row is evaluated merged (``nn.lora_merge``, the base
model's parameters) and the script checks that it matches the unmerged model.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = os.path.join(ROOT, "configs")
# (label, config, run directory name, extra overrides); the L2-pull rows: --l2-pull
VARIANTS = [
    ("full FT, lr 3e-4", "charlm_finetune", "charlm_finetune", []),
    ("full FT, lr 3e-3", "charlm_finetune", "charlm_finetune_high",
     ["optimizer.learning_rate=0.003"]),
    ("LoRA r=4, lr 3e-3", "charlm_lora", "charlm_lora", []),
]


def _train(config: str, out_dir: str, overrides: list[str]) -> None:
    from bpkit import cli
    code = cli.main(["train", os.path.join(CONFIGS, f"{config}.yaml"), f"run.out_dir={out_dir}",
                     "run.progress=log", "run.sample_length=0", *overrides])
    if code:
        raise SystemExit(f"training {config} into {out_dir} failed (exit {code})")


def _losses(trained, datasets, params, apply_task=None, eval_batches: int = 16) -> dict:
    """Mean held-out loss of ``params`` on each corpus (first ``eval_batches`` batches)."""
    from bpkit.data import eval_batches as batches
    from bpkit.train.step import evaluate, make_eval_step
    task = apply_task or trained.task
    step = make_eval_step(task.metric_fn)
    return {name: evaluate(step, params, batches(ds, trained.cfg.data.eval_batch_size,
                                                 eval_batches))["loss"]
            for name, ds in datasets.items()}


def _trainable(trained) -> int:
    import jax
    import numpy as np

    from bpkit.train.optim import frozen_mask
    o = trained.cfg.optimizer
    mask = frozen_mask(trained.params, tuple(o.freeze), tuple(o.trainable))
    return int(sum(np.size(p) for p, f in zip(jax.tree_util.tree_leaves(trained.params),
                                              jax.tree_util.tree_leaves(mask)) if not f))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", default="runs/charlm_gpt",
                   help="run directory of configs/charlm_gpt.yaml (trained here if missing)")
    p.add_argument("--out", default="runs/forgetting", help="where the fine-tuned runs go")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per variant")
    p.add_argument("--l2-pull", default="0.001,0.01,0.1",
                   help="optimizer.l2_pull strengths of the charlm_l2_pull rows (comma-separated)")
    p.add_argument("--eval-batches", type=int, default=16,
                   help="held-out batches (of 64 sequences) per corpus")
    p.add_argument("overrides", nargs="*",
                   help="section.key=value for every run (e.g. model sizes for a quick look)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from bpkit import models, nn
    from bpkit.data import dataset_from_config
    from bpkit.train import outputs
    from bpkit.train.tasks import build_task

    t0 = time.time()
    pre = os.path.abspath(args.pretrained)
    if not os.path.isdir(os.path.join(pre, "checkpoints")):
        _train("charlm_gpt", pre, args.overrides)
    base = outputs.restore(pre)
    if base is None:
        raise SystemExit(f"{pre} has no usable checkpoint; delete it and rerun")
    datasets = {corpus: dataset_from_config(dataclasses.replace(base.cfg.data, corpus=corpus))
                for corpus in ("python_source", "python_docs")}
    before = _losses(base, datasets, base.params, eval_batches=args.eval_batches)
    rows = []
    pulls = [(f"full FT + L2 pull {v}, lr 3e-3", "charlm_l2_pull", f"charlm_l2_pull_{v}",
              [f"optimizer.l2_pull={v}"]) for v in args.l2_pull.split(",") if v.strip()]
    for label, config, name, extra in VARIANTS + pulls:
        out = os.path.join(os.path.abspath(args.out), name)
        if not os.path.isdir(os.path.join(out, "checkpoints")):
            _train(config, out, [f"model.init_from={pre}", f"run.steps={args.steps}",
                                 *extra, *args.overrides])
        run = outputs.restore(out)
        losses = _losses(run, datasets, run.params, eval_batches=args.eval_batches)
        row = {"label": label, "run": out, "trainable": _trainable(run),
               "total": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(run.params))),
               "loss_a": losses["python_source"], "loss_b": losses["python_docs"]}
        if run.cfg.model.args.get("lora_rank"):  # evaluate merged; it must match unmerged
            alpha = run.cfg.model.args.get(
                "lora_alpha", inspect.signature(models.gpt).parameters["lora_alpha"].default)
            merged = nn.lora_merge(run.params, alpha)
            plain_cfg = dataclasses.replace(run.cfg, model=dataclasses.replace(
                run.cfg.model, args={k: v for k, v in run.cfg.model.args.items()
                                     if not k.startswith("lora_")}))
            plain = build_task(plain_cfg, run.ds)
            merged_losses = _losses(run, datasets, merged, plain, args.eval_batches)
            row["merge_max_abs_diff"] = max(abs(merged_losses[k] - losses[k]) for k in losses)
        row["forgetting"] = row["loss_a"] - before["python_source"]
        row["gain"] = before["python_docs"] - row["loss_b"]
        rows.append(row)

    header = ("| fine-tuning | trainable params | loss A (source) | loss B (prose) | "
              "forgetting (A up) | gain (B down) |\n|---|---:|---:|---:|---:|---:|\n")
    lines = [f"| pre-trained (before) | - | {before['python_source']:.3f} | "
             f"{before['python_docs']:.3f} | - | - |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['trainable']:,} of {r['total']:,} | "
                     f"{r['loss_a']:.3f} | {r['loss_b']:.3f} | {r['forgetting']:+.3f} | "
                     f"{r['gain']:+.3f} |")
    table = header + "\n".join(lines) + "\n"
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "forgetting.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "forgetting.json"), "w") as f:
        json.dump({"before": before, "rows": rows, "wall_s": time.time() - t0}, f, indent=1)
    _plot(rows, os.path.join(out_dir, "forgetting.png"))
    print(table)
    for r in rows:
        if "merge_max_abs_diff" in r:
            print(f"{r['label']}: merged vs unmerged loss differ by at most "
                  f"{r['merge_max_abs_diff']:.2e}")
    print(f"wall time {time.time() - t0:.0f} s; written to {out_dir}")
    return 0


def _plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.scatter(r["gain"], r["forgetting"])
        ax.annotate(r["label"], (r["gain"], r["forgetting"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.margins(x=0.35, y=0.1)  # room for the labels
    ax.set_xlabel("gain: loss on B (prose) before - after")
    ax.set_ylabel("forgetting: loss on A (source) after - before")
    ax.set_title("Fine-tuning a char GPT from Python source to prose")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
