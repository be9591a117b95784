"""Training on a mesh of simulated devices: mesh.data of 2, 4 and 8 and an fsdp mesh give the
losses of one device; a sharded checkpoint restores onto another device count; summary.json
reports the devices; meshes that do not fit exit 2 with a clear message."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from bpkit import cli
from bpkit.config import ConfigError, load_config
from bpkit.train import loop
from tests.train.helpers import CONFIGS, summary, train_losses

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; "
                                "run with XLA_FLAGS=--xla_force_host_platform_device_count=8")

CFG = os.path.join(CONFIGS, "mnist1d_mlp.yaml")
SMALL = ["run.steps=10", "run.log_every=1", "run.eval_every=0", "run.checkpoint_every=5",
         "run.keep_checkpoints=0", "run.progress=log", "run.check_parity=false",
         "data.batch_size=32", "data.eval_batch_size=500", "model.args.hidden=[16]",
         "optimizer.warmup_steps=2"]


def _train(run_dir, *overrides):
    cfg = load_config(CFG, SMALL + [f"run.out_dir={run_dir}", *overrides])
    return loop.train(cfg, out=lambda msg: None)


_ONE: list = []


@pytest.fixture
def one_device(tmp_path_factory):
    """The one-device reference run, trained once (inside the training dtype settings)."""
    if not _ONE:
        run = tmp_path_factory.mktemp("one")
        _train(run)
        _ONE.append(run)
    return _ONE[0]


def _losses(run):
    return np.array([loss for _, loss in train_losses(run)])


@pytest.mark.parametrize("data,fsdp", [(2, 1), (4, 1), (8, 1), (2, 2)])
def test_mesh_losses_match_one_device(one_device, tmp_path, data, fsdp):
    s = _train(tmp_path, f"mesh.data={data}", f"mesh.fsdp={fsdp}")
    np.testing.assert_allclose(_losses(tmp_path), _losses(one_device), rtol=1e-5)
    assert len(_losses(tmp_path)) == 10
    assert s["devices"] == data * fsdp == summary(tmp_path)["devices"]
    assert summary(tmp_path)["mesh"] == {"data": data, "fsdp": fsdp}
    assert summary(one_device)["devices"] == 1


@pytest.mark.parametrize("saved,resumed", [(["mesh.data=4"], ["mesh.data=2"]),
                                           (["mesh.data=2", "mesh.fsdp=2"], ["mesh.data=1"])])
def test_sharded_checkpoint_restores_onto_another_device_count(one_device, tmp_path, saved,
                                                                resumed):
    run = tmp_path / "run"
    _train(run, *saved)
    shutil.rmtree(run / "checkpoints" / "10")          # as if the run had died after step 5
    s = _train(run, *resumed)
    assert s["resumed_from"] == 5
    np.testing.assert_allclose(_losses(run), _losses(one_device), rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["mesh.data=16"], "The mesh asks for 16 devices (mesh.data=16 x mesh.fsdp=1) but only 8"),
    (["mesh.data=4", "mesh.fsdp=2", "data.batch_size=36"],
     "The batch size 36 is not divisible by the 8 devices of the mesh"),
])
def test_meshes_that_do_not_fit_exit_2(tmp_path, capsys, overrides, message):
    code = cli.main(["train", CFG, *SMALL, f"run.out_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("overrides,message", [
    (["distributed.coordinator_address=host:1234"], "set coordinator_address, num_processes and "
                                                   "process_id together"),
    (["distributed.coordinator_address=host:1234", "distributed.num_processes=2",
      "distributed.process_id=2"], "distributed.process_id: got 2, expected 0 .. 1"),
    (["distributed.auto=true", "distributed.num_processes=2"], "leave distributed.num_processes"),
    (["distributed.coordinator_address=h:1", "distributed.num_processes=3",
      "distributed.process_id=0"], "data.batch_size: 32 is not divisible by "
                                   "distributed.num_processes=3"),
])
def test_distributed_config_is_validated(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(CFG, SMALL + overrides)


def test_single_process_by_default_does_not_initialize(tmp_path):
    cfg = load_config(CFG, SMALL)
    assert cfg.distributed.coordinator_address is None and not cfg.distributed.auto
    assert loop.setup_distributed(cfg) is False
    assert jax.process_count() == 1
    full = cfg.to_dict()
    assert full["distributed"] == {"coordinator_address": None, "num_processes": None,
                                   "process_id": None, "auto": False}
    assert json.loads(json.dumps(full))["mesh"] == {"data": 1, "fsdp": 1}
