"""Your own model in a config (bpkit.models.adapters): a hand-written bpkit Model and a Flax
linen (with BatchNorm state), Flax NNX, Equinox and Haiku model each train from
``model.name: tests/models/user_models.py:<factory>`` through the same loop, with the
first-batch parity check (bpkit vs jax.grad) on. A library that is not installed skips its
case with the reason."""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import pytest

from bpkit.config import ConfigError, load_config
from tests.numerics import user_numerics
from tests.train.helpers import CONFIGS, REPO, TINY

FILE = os.path.join(REPO, "tests", "models", "user_models.py")
LIBRARIES = {"bpkit_mlp": None, "linen_mlp": "flax", "nnx_mlp": "flax",
             "equinox_mlp": "equinox", "haiku_mlp": "haiku"}


# Each library's case costs seconds of compilation: two run by default, all with -m slow.
@pytest.mark.parametrize("factory", [f if f in ("bpkit_mlp", "equinox_mlp") else
                                     pytest.param(f, marks=pytest.mark.slow) for f in LIBRARIES])
def test_own_model_trains_from_a_config(factory, tmp_path):
    lib = LIBRARIES[factory]
    if lib and importlib.util.find_spec(lib) is None:
        pytest.skip(f"{lib} is not installed (pip install {'dm-haiku' if lib == 'haiku' else lib})")
    from bpkit.train import loop
    cfg = load_config(os.path.join(CONFIGS, "mnist1d_mlp.yaml"), [
        *TINY, "run.steps=10", "run.eval_every=0", "run.checkpoint_every=0",
        f"model.name={FILE}:{factory}", "model.args={hidden: 12}", f"run.out_dir={tmp_path}",
        "diagnostics.every=5"])
    with user_numerics(), jax.numpy_rank_promotion("allow"):  # as users run their models
        summary = loop.train(cfg, out=lambda m: None)
    assert summary["steps"] == 10 and 0 <= summary["eval_accuracy"] <= 1
    assert summary["parameters"] == 40 * 12 + 12 + 12 * 10 + 10 + (24 if factory == "linen_mlp"
                                                                  else 0)
    with open(tmp_path / "metrics.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if r.get("split") == "train"]
    assert steps == [1, 5, 10]


@pytest.mark.parametrize("name, words", [
    ("nowhere.py:f", "no file 'nowhere.py'"),
    ("my_model", "unknown model"),
    ("a b:f", "neither a .py file nor a module name"),
    (f"{FILE}:nothing", "has no function 'nothing'; it defines bpkit_mlp"),
    ("json:dumps", "cannot be called with"),
])
def test_own_model_mistakes_are_config_errors(name, words):
    from bpkit.data import dataset_from_config
    from bpkit.train.tasks import build_task
    cfg = None
    try:
        cfg = load_config(os.path.join(CONFIGS, "mnist1d_mlp.yaml"),
                          [f"model.name={name}", "model.args={}"])
        with user_numerics():
            build_task(cfg, dataset_from_config(cfg.data, 0))
    except ConfigError as e:
        assert words in str(e)
    else:
        pytest.fail(f"{name} was accepted")
