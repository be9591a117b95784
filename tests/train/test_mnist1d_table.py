"""The shipped MNIST-1D configs meet the paper's test accuracies (full-size training: slow)."""
import os

import pytest

from tests.train.helpers import CONFIGS, bpkit, summary

PAPER = {"mnist1d_logreg": 0.32, "mnist1d_mlp": 0.68, "mnist1d_cnn": 0.94, "mnist1d_cnn_bn": 0.94,
         "mnist1d_gru": 0.91}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER))
def test_meets_the_paper(name, tmp_path):
    p = bpkit("train", os.path.join(CONFIGS, f"{name}.yaml"), f"run.out_dir={tmp_path}",
              "run.progress=log", timeout=1800)
    assert p.returncode == 0, p.stderr
    assert summary(tmp_path)["eval_accuracy"] >= PAPER[name]
