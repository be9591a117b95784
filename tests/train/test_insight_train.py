"""What a hand-run backward pass adds to training: a diverging run names where its NaN came
from (console and metrics.jsonl), layer health is logged and plotted, DP-SGD trains and
reports its privacy parameters, and misconfigured DP is refused before the first step."""
import json
import os

import pytest

from bpkit.config import ConfigError, load_config
from bpkit.train import loop
from bpkit.train.window import NonFiniteLoss
from tests.train.helpers import CONFIGS


def _train(config, overrides, run_dir):
    lines = []
    cfg = load_config(os.path.join(CONFIGS, config), overrides + [f"run.out_dir={run_dir}"])
    try:
        loop.train(cfg, out=lines.append)
        error = None
    except NonFiniteLoss as e:
        error = e
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return recs, lines, error


def test_diverging_run_names_the_origin_of_its_nan(tmp_path):
    recs, lines, error = _train("diverging_lr.yaml", ["run.progress=log"], tmp_path)
    assert error is not None and error.step is not None
    origin = [r for r in recs if r.get("split") == "nonfinite"]
    assert len(origin) == 1 and origin[0]["step"] == error.step
    report = origin[0]["nonfinite_origin"]
    assert report["forward"]["primitive"] == "dot_general"
    assert report["forward"]["layer"] == "mlp/head"
    assert report["forward"]["location"].split(":")[0].endswith(os.path.join("nn", "layers.py"))
    line = next(m for m in lines if m.startswith("nonfinite origin: update"))
    assert "The forward pass first produced" in line and "inf at `dot_general`" in line


def test_layer_health_and_dp_sgd(tmp_path):
    """One run: DP-SGD trains and reports its privacy parameters; layer health is logged and
    plotted."""
    recs, lines, _ = _train("mnist1d_mlp.yaml", [
        "run.steps=4", "run.log_every=2", "run.eval_every=0", "run.checkpoint_every=0",
        "run.progress=log", "run.check_parity=false", "data.batch_size=32",
        "data.eval_batch_size=500", "model.args.hidden=[16]", "model.args.activation=relu",
        "diagnostics.every=2", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
        "optimizer.dp={l2_clip: 0.5, noise_multiplier: 1.0}"], tmp_path)
    health = [r for r in recs if "backward_signals" in r][-1]["backward_signals"]
    assert set(health) == {"dense_0", "relu_0", "head"}
    for name in ("dense_0", "head"):
        h = health[name]
        assert h["param_norm"] > 0 and h["update_norm"] > 0
        assert -6 < h["update_ratio_log10"] < 0
    assert 0 <= health["relu_0"]["dead_fraction"] <= 1 and health["relu_0"]["param_norm"] is None
    assert health["dense_0"]["act_std"] > 0
    assert os.path.getsize(tmp_path / "plots" / "layer_health.png") > 10_000

    train = [r for r in recs if r.get("split") == "train"]
    assert 0 <= train[-1]["dp_clipped_fraction"] <= 1
    assert any("DP-SGD: per-example clip 0.5, noise multiplier 1" in m for m in lines)
    with open(tmp_path / "summary.json") as f:
        dp = json.load(f)["dp"]
    assert dp["noise_multiplier"] == 1.0 and dp["steps"] == 4
    assert dp["sampling_rate"] == pytest.approx(32 / 4000)


@pytest.mark.parametrize("override,message", [
    (["run.engine=jax"], "only bpkit's engine"),
    (["optimizer.dp={l2_clip: -1, noise_multiplier: 1}"], "optimizer.dp.l2_clip"),
    (["optimizer.dp={l2_clip: 1, noise_multiplier: 1, clip: 2}"], "optimizer.dp.clip: unknown"),
])
def test_dp_misconfigurations_are_refused(tmp_path, override, message):
    dp = [] if any(o.startswith("optimizer.dp") for o in override) else [
        "optimizer.dp={l2_clip: 1, noise_multiplier: 1}"]
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(CONFIGS, "mnist1d_mlp.yaml"),
                    dp + override + [f"run.out_dir={tmp_path}"])
