"""Config loading: typed sections, dotted overrides, and one-line errors that exit 2."""
import os

import pytest

from bpkit import cli
from bpkit.config import ConfigError, config_from_dict, dump_config, load_config
from tests.train.helpers import CONFIGS, REPO


def test_every_shipped_config_loads():
    names = sorted(os.listdir(CONFIGS))
    assert len(names) >= 10
    for name in names:
        cfg = load_config(os.path.join(CONFIGS, name))
        assert cfg.run.name == name[:-len(".yaml")]


def test_overrides_are_typed():
    cfg = load_config(os.path.join(CONFIGS, "mnist1d_mlp.yaml"),
                      ["run.steps=7", "optimizer.learning_rate=1e-2", "run.check_parity=false",
                       "model.args.hidden=[8,8]", "optimizer.clip_norm=null"])
    assert cfg.run.steps == 7 and cfg.optimizer.learning_rate == 0.01
    assert cfg.run.check_parity is False and cfg.model.args["hidden"] == [8, 8]
    assert cfg.optimizer.clip_norm is None
    assert load_config(os.path.join(CONFIGS, "mnist1d_mlp.yaml"),
                       ["optimizer.learning_rate=1"]).optimizer.learning_rate == 1.0


def test_dump_round_trips():
    import yaml
    cfg = load_config(os.path.join(CONFIGS, "charlm_gpt.yaml"), ["run.steps=3"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again.to_dict() == {**cfg.to_dict(), "run": {**cfg.to_dict()["run"],
                                                       "out_dir": cfg.out_dir}}


@pytest.mark.parametrize("overrides, message", [
    (["run.stpes=10"], "unknown key 'run.stpes' (did you mean 'run.steps'?)"),
    (["optimiser.name=adam"], "unknown section 'optimiser' in override 'optimiser.name=adam' "
                              "(did you mean 'optimizer'?)"),
    (["run.steps=ten"], "run.steps: got 'ten' (str), expected an integer"),
    (["run.steps=1.5"], "run.steps: got 1.5 (float), expected an integer"),
    (["run.engine=torch"], "run.engine: got 'torch', expected one of 'bpkit', 'jax'"),
    (["optimizer.name=adamm"], "optimizer.name: got 'adamm', expected one of 'sgd'"),
    (["run.check_parity=maybe"], "run.check_parity: got 'maybe' (str), expected true or false"),
    (["run.steps"], "override 'run.steps' must look like section.key=value"),
    (["mesh.fsdp=0"], "mesh.fsdp: got 0; use an integer from 1 to 65,536"),
    (["distributed.num_processes=2"], "distributed: set coordinator_address, num_processes and "
                                      "process_id together"),
    (["distributed.auto=true", "distributed.process_id=0"],
     "distributed.auto: true detects the cluster by itself; leave distributed.process_id null"),
    (["diagnostics.every=-1"], "diagnostics.every: got -1; use an integer from 0 to "),
    (["model.args.hiden=[4]"], "unknown key 'model.args.hiden' for model mlp "
                               "(did you mean 'model.args.hidden'?)"),
])
def test_user_errors_exit_2_with_one_line(overrides, message, capsys):
    code = cli.main(["parity", os.path.join(CONFIGS, "mnist1d_mlp.yaml"), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_file_is_named(capsys):
    assert cli.main(["train", "configs/no_such.yaml"]) == 2
    assert "config file not found: configs/no_such.yaml" in capsys.readouterr().err


def test_unknown_key_in_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: x\n  log_evry: 5\n")
    assert cli.main(["train", str(path)]) == 2
    assert "unknown key 'run.log_evry' (did you mean 'run.log_every'?)" in capsys.readouterr().err


def test_bad_yaml_and_bad_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: invalid YAML"):
        load_config(str(path))
    path.write_text("run: 3\n")
    with pytest.raises(ConfigError, match="section 'run' must be a mapping"):
        load_config(str(path))


def test_default_out_dir():
    cfg = config_from_dict({"run": {"name": "abc"}})
    assert cfg.out_dir == os.path.join("runs", "abc")
    assert os.path.isdir(REPO)
