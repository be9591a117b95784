"""Backward signals in training: metrics.jsonl lines with the layers in depth order,
plots/gradient_flow.png, a vanishing warning for a deep sigmoid stack and none for a residual
one, and a train step that is unchanged (same HLO) when diagnostics are on."""
import json
import os

import jax
import pytest

from bpkit.config import load_config
from bpkit.data import train_batch
from bpkit.train import loop
from tests.train.helpers import CONFIGS

MLP = ["run.steps=6", "run.log_every=3", "run.eval_every=0", "run.checkpoint_every=0",
       "run.progress=log", "run.check_parity=false", "data.batch_size=32",
       "data.eval_batch_size=500", "model.args.hidden=[16]", "diagnostics.every=3"]


def _run(config, overrides, run_dir):
    lines = []
    cfg = load_config(os.path.join(CONFIGS, config), overrides + [f"run.out_dir={run_dir}"])
    loop.train(cfg, out=lines.append)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return recs, lines


@pytest.mark.parametrize("engine", ["bpkit", "jax"])
def test_signals_are_logged_and_plotted(tmp_path, engine):
    recs, _ = _run("mnist1d_mlp.yaml", MLP + [f"run.engine={engine}"], tmp_path)
    logged = {r["step"]: r["backward_signals"] for r in recs if "backward_signals" in r}
    assert sorted(logged) == [1, 3, 6]
    sig = logged[6]
    if engine == "bpkit":
        assert list(sig) == ["dense_0", "tanh_0", "head"]       # depth order, no model root
        assert sig["tanh_0"]["param_grad_norm"] is None          # no parameters
        assert all(v["activation_grad_norm"] > 0 for v in sig.values())
    else:  # jax.grad exposes no intermediate cotangents: parameter gradients only
        assert list(sig) == ["dense_0", "head"]
        assert all(v["activation_grad_norm"] is None for v in sig.values())
    assert all(sig[n]["param_grad_norm"] > 0 for n in ("dense_0", "head"))
    assert os.path.getsize(tmp_path / "plots" / "gradient_flow.png") > 10_000


DEEP = ["run.steps=2", "run.log_every=1", "run.eval_every=0", "run.checkpoint_every=0",
        "run.progress=log", "run.check_parity=false", "data.batch_size=32",
        "data.eval_batch_size=500", "model.args.width=16", "model.args.depth=10",
        "diagnostics.every=1"]


def test_vanishing_warning_for_deep_sigmoid_only(tmp_path):
    recs, lines = _run("deep_sigmoid.yaml", DEEP, tmp_path / "sigmoid")
    warnings = [m for m in lines if m.startswith("warning:") and "backward signal" in m]
    assert len(warnings) == 1 and "vanishes at layer 'dense_0'" in warnings[0], lines
    # layer health agrees: the bottom layers' updates are tiny next to their weights
    assert any("layer 'dense_0' barely moves" in m for m in lines), lines
    assert "Also vanishes at" in warnings[0]               # one line, not one per layer
    sig = [r for r in recs if "backward_signals" in r][-1]["backward_signals"]
    assert list(sig)[:3] == ["dense_0", "sigmoid_0", "dense_1"] and list(sig)[-1] == "head"
    assert sig["dense_0"]["activation_grad_norm"] < 1e-3 * sig["head"]["activation_grad_norm"]

    recs, lines = _run("deep_residual.yaml", DEEP, tmp_path / "residual")
    assert not [m for m in lines if m.startswith("warning:")], lines
    sig = [r for r in recs if "backward_signals" in r][-1]["backward_signals"]
    top = [n for n in sig if "/" not in n]
    assert top == ["stem"] + [f"block_{i}" for i in range(10)] + ["relu_out", "head"]
    assert "block_3/body/dense" in sig                               # nested layers logged
    assert os.path.exists(tmp_path / "residual" / "plots" / "gradient_flow.png")


def test_train_step_is_unchanged_by_diagnostics():
    hlos = []
    for every in (0, 5):
        cfg = load_config(os.path.join(CONFIGS, "mnist1d_mlp.yaml"),
                          MLP + [f"diagnostics.every={every}"])
        ds, task, tx, schedule = loop.build(cfg)
        state = loop.init_state(cfg, task, tx)
        step, _ = loop.make_steps(cfg, task, tx, schedule)
        batch = jax.tree_util.tree_map(jax.numpy.asarray, train_batch(ds, 0, 32, 0))
        hlos.append(step.lower(state, batch).as_text())
    assert hlos[0] == hlos[1]
