"""The run directory's pieces without a training run: which config changes a run accepts on
resume, path resolution, strict JSON, and the non-finite policy of the metrics window (a NaN
gradient norm with a finite loss stops the run too)."""
import json
import os

import numpy as np
import pytest

from bpkit.config import config_from_dict
from bpkit.paths import resolve_paths
from bpkit.train import resume
from bpkit.train.window import MetricsWindow, NonFiniteLoss, TooManySkipped
from bpkit.train.writers import dumps, finite_record


def _flat(**sections):
    return resume._normal(config_from_dict(sections).to_dict())


@pytest.mark.parametrize("change, refused", [
    ({"run": {"steps": 2000}}, []),                                     # constant schedule
    ({"run": {"log_every": 7, "checkpoint_every": 3, "progress": "bar"}}, []),
    ({"mesh": {"data": 2}}, []),                                        # whole-array checkpoints
    ({"optimizer": {"learning_rate": 0.01}}, ["optimizer.learning_rate"]),
    ({"model": {"args": {"hidden": [32]}}}, ["model.args.hidden"]),
    ({"run": {"seed": 3, "engine": "jax"}}, ["run.engine", "run.seed"]),
])
def test_trajectory_keys_are_refused_the_others_accepted(change, refused):
    base = {"model": {"args": {"hidden": [16]}}}
    assert [k for k, _, _ in resume.differences(_flat(**base), _flat(**{**base, **change}))
            ] == refused


def test_more_steps_stretch_a_cosine_schedule():
    old = _flat(optimizer={"schedule": "cosine"}, run={"steps": 1500})
    new = _flat(optimizer={"schedule": "cosine"}, run={"steps": 3000})
    assert resume.differences(old, new) == [("optimizer.decay_steps", 1500, 3000)]
    pinned = _flat(optimizer={"schedule": "cosine", "decay_steps": 1500}, run={"steps": 3000})
    assert resume.differences(old, pinned) == []


def test_paths_are_absolute_once_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(config_from_dict({"run": {"name": "abc"},
                                          "model": {"init_from": "runs/base"},
                                          "data": {"path": "~/d.npz"}}))
    assert cfg.run.out_dir == os.path.join(str(tmp_path), "runs", "abc")
    assert cfg.model.init_from == os.path.join(str(tmp_path), "runs", "base")
    assert cfg.data.path == os.path.join(os.path.expanduser("~"), "d.npz")
    assert resolve_paths(cfg).run.out_dir == cfg.run.out_dir          # idempotent


def test_json_never_holds_bare_nan():
    rec = {"loss": float("nan"), "acc": 0.5, "sig": {"a": {"norm": float("inf")}}}
    assert finite_record(rec) == {"loss": None, "acc": 0.5, "sig": {"a": {"norm": None}},
                                  "nonfinite": ["loss", "sig.a.norm"]}
    json.loads(dumps(rec), parse_constant=lambda c: pytest.fail(c))


def _window(policy, max_skipped=10):
    return MetricsWindow(policy, max_skipped, lambda: "No checkpoint exists yet.",
                         lambda msg: None)


def test_a_nonfinite_gradient_norm_stops_even_with_a_finite_loss():
    w = _window("stop")
    w.add(1, {"loss": np.float32(2.3), "grad_norm": np.float32(1.0)})
    w.add(2, {"loss": np.float32(2.2), "grad_norm": np.float32(np.nan)})
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient norm \(nan\) at step 2;"
                                            r".*No checkpoint exists yet"):
        w.check()
    last = w.record()
    assert last["step"] == 2 and np.isnan(last["grad_norm"])


def test_skips_in_a_row_stop_after_max_skipped():
    w = _window("skip", max_skipped=3)
    for step, skipped in enumerate([1, 1, 0, 1, 1], start=1):       # the streak resets
        w.add(step, {"loss": np.float32(np.nan if skipped else 1.0), "skipped": skipped})
    rec = w.take(5)
    assert rec["skipped"] == 4 and rec["loss"] == 1.0 and w.streak == 2
    w.add(6, {"loss": np.float32(np.nan), "skipped": 1})
    with pytest.raises(TooManySkipped, match=r"3 updates in a row \(steps 4-6\)"):
        w.check()
