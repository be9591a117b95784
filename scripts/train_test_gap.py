"""The train/test gap of every run of a sweep: each run's final parameters evaluated in
evaluation mode (dropout off, BatchNorm's running statistics) on its training split and on
its test split, as one Markdown table.

    bpkit sweep configs/digits_cnn.yaml optimizer.weight_decay=0,0.05 \\
        model.args.dropout=0,0.3 --out runs/digits_regularisation
    python scripts/train_test_gap.py runs/digits_regularisation

The training loss ``bpkit`` logs is taken in training mode (with dropout), which would hide
the gap dropout closes; this evaluates both splits the same way. Writes ``<sweep>/gap.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="a directory of run directories (bpkit sweep --out)")
    args = p.parse_args(argv)

    from bpkit.data import eval_batches
    from bpkit.train import loop, outputs
    from bpkit.train.step import evaluate, make_eval_step

    lines = ["| run | train loss | test loss | train accuracy | test accuracy | "
             "gap (train - test accuracy) |", "|---|---:|---:|---:|---:|---:|"]
    for name in sorted(os.listdir(args.sweep_dir)):
        run_dir = os.path.join(args.sweep_dir, name)
        trained = outputs.restore(run_dir) if os.path.isdir(run_dir) else None
        if trained is None:
            continue
        state = loop.TrainState(0, trained.params, None, trained.model_state, None)
        task = trained.task
        eval_step = (make_eval_step(lambda inputs, b: task.metric_fn(inputs[0], b, inputs[1]))
                     if task.stateful else make_eval_step(task.metric_fn))
        inputs = loop.eval_inputs(task, state)
        ds = trained.ds
        on_train = dataclasses.replace(ds, x_test=ds.x_train, y_test=ds.y_train)
        size = trained.cfg.data.eval_batch_size
        tr = evaluate(eval_step, inputs, eval_batches(on_train, size))
        te = evaluate(eval_step, inputs, eval_batches(ds, size))
        lines.append(f"| {name} | {tr['loss']:.4f} | {te['loss']:.4f} | "
                     f"{tr['accuracy']:.2%} | {te['accuracy']:.2%} | "
                     f"{tr['accuracy'] - te['accuracy']:+.2%} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.sweep_dir, "gap.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
