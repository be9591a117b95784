"""The application configs reach their targets when trained as shipped (full-size: slow).

digits_cnn >= 98% test accuracy; reverse_transformer >= 99% exact match (greedy decoding);
ddpm_2d's held-out chamfer distance below gan_2d's on the same data (in no more training
steps' time: see README); cartpole_reinforce's mean return >= 475 over 100 held-out episodes.
"""
import json
import os

import pytest

from tests.train.helpers import CONFIGS, bpkit, summary


def _train(name, run_dir):
    p = bpkit("train", os.path.join(CONFIGS, f"{name}.yaml"), f"run.out_dir={run_dir}",
              "run.progress=log", timeout=3600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    return evals[-1]


@pytest.mark.slow
def test_digits_cnn_reaches_98_percent(tmp_path):
    _train("digits_cnn", tmp_path)
    assert summary(tmp_path)["eval_accuracy"] >= 0.98


@pytest.mark.slow
def test_reverse_transformer_reaches_99_percent_exact_match(tmp_path):
    assert _train("reverse_transformer", tmp_path)["eval_accuracy"] >= 0.99


@pytest.mark.slow
def test_ddpm_beats_the_gan_on_the_same_data(tmp_path):
    ddpm = _train("ddpm_2d", tmp_path / "ddpm")
    gan = _train("gan_2d", tmp_path / "gan")
    assert ddpm["eval_chamfer"] < gan["eval_chamfer"]


@pytest.mark.slow
def test_cartpole_reinforce_reaches_475(tmp_path):
    last = _train("cartpole_reinforce", tmp_path)
    assert last["eval_return"] >= 475
    p = bpkit("eval", str(tmp_path))  # the checkpoint replays the same held-out episodes
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["eval_return"] == last["eval_return"]
