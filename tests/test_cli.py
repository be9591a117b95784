"""The ``bpkit`` command end to end, in a fresh process, on a config that trains in seconds."""
import json
import os


import pytest

from bpkit import cli
from tests.numerics import user_numerics as training_numerics
from tests.train.helpers import CONFIGS, TINY, bpkit, summary, train_losses


def environment(run) -> dict:
    with open(run / "environment.json") as f:
        return json.load(f)


def test_train_eval_plot_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = os.path.join(CONFIGS, "mnist1d_mlp.yaml")
    p = bpkit("train", cfg, *TINY, f"run.out_dir={run}")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for word in ("parameters, all trainable", "mnist1d: 4,000 train / 1,000 test", "engine  bpkit",
                 "devices", "parity  first batch: max |bpkit - jax.grad|", "OK", "step     30/30",
                 "done: 30 steps"):
        assert word in out, out
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml", "environment.json",
                                       "metrics.jsonl", "parity.json", "plots", "report.html",
                                       "summary.json", "tb", "train.lock"]
    s = summary(run)
    for key in ("steps", "train_loss", "eval_loss", "eval_accuracy", "wall_seconds",
                "examples_per_second", "engine", "devices"):
        assert key in s
    assert s["steps"] == 30 and s["engine"] == "bpkit" and 0 <= s["eval_accuracy"] <= 1
    assert sorted(os.listdir(run / "checkpoints"), key=int) == ["10", "20", "30"]
    assert {"loss.png", "accuracy.png", "learning_rate.png", "grad_norm.png"} <= set(
        os.listdir(run / "plots"))
    assert [s for s, _ in train_losses(run)] == [5, 10, 15, 20, 25, 30]

    # The other commands in this process (a fresh process each costs seconds of start-up).
    with training_numerics():
        assert cli.main(["eval", str(run)]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["step"] == 30
        assert res["eval_loss"] == pytest.approx(s["eval_loss"], rel=1e-5)

        os.remove(run / "plots" / "loss.png")
        assert cli.main(["plot", str(run)]) == 0
        assert os.path.exists(run / "plots" / "loss.png")

        # Training the finished run again resumes at its end and changes nothing; XLA's own
        # compiler options instead of the measured ones (run.xla_options) may change on resume.
        assert environment(run)["compiler_options"]  # CPU: the measured options
        assert cli.main(["train", cfg, *TINY, f"run.out_dir={run}", "run.xla_options=default"]) == 0
        assert summary(run)["train_loss"] == s["train_loss"]
        assert environment(run)["compiler_options"] == {}


def test_gan_run_is_evaluated_on_held_out_points(tmp_path, capsys):
    """GAN runs get a held-out loss and a sample-distance metric that falls as they train."""
    run = tmp_path / "gan"
    p = bpkit("train", os.path.join(CONFIGS, "gan_2d.yaml"), "run.steps=1000", "run.eval_every=250",
              "run.log_every=250", "run.checkpoint_every=0", "run.progress=log",
              f"run.out_dir={run}")
    assert p.returncode == 0, p.stderr
    with open(run / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [250, 500, 750, 1000]
    assert evals[-1]["eval_chamfer"] < 0.5 * evals[0]["eval_chamfer"]
    assert summary(run)["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    with training_numerics():
        assert cli.main(["eval", str(run)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["eval_chamfer"] == pytest.approx(evals[-1]["eval_chamfer"], rel=1e-5)


def test_plot_and_eval_need_a_run_dir(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_rules_subcommand_is_delegated(monkeypatch):
    import sys
    import types
    seen = []
    fake = types.ModuleType("bpkit.check.coverage")
    fake.rules_command = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "bpkit.check.coverage", fake)
    assert cli.main(["rules", "--missing", "x"]) == 0
    assert seen == [["--missing", "x"]]


def test_scripts_are_thin_equivalents():
    root = os.path.dirname(CONFIGS)
    for name in ("train", "eval", "plot", "parity"):
        text = open(os.path.join(root, "scripts", f"{name}.py")).read()
        assert f'main(["{name}", *sys.argv[1:]])' in text


def test_version_and_help(capsys):
    from bpkit import __version__
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"bpkit {__version__}"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("CONFIG", "key=value", "bpkit config show CONFIG", "Exit status",
                 "in any order"):
        assert word in out, out


def test_parity_takes_flags_and_overrides_in_any_order(capsys):
    """``--no-fd`` between the config and the overrides, and it says what it skipped."""
    code = cli.main(["parity", os.path.join(CONFIGS, "regression_mse.yaml"), "--no-fd",
                     "data.batch_size=2", "model.args.hidden=[4]"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "finite differences skipped (--no-fd)" in out


def test_config_show_prints_the_resolved_config(capsys):
    import yaml
    from bpkit.config import config_from_dict, load_config
    cfg_path = os.path.join(CONFIGS, "mnist1d_mlp.yaml")
    assert cli.main(["config", "show", "run.steps=7", cfg_path, "model.args.hidden=[8]"]) == 0
    out = capsys.readouterr().out
    assert "  steps: 7" in out and "# optimizer steps" in out
    assert "    hidden: [8]" in out and "# activation:" not in out  # given, so not a comment
    assert "    # in_features: 40" in out                             # the factory's others
    expected = load_config(cfg_path, ["run.steps=7", "model.args.hidden=[8]"])
    assert config_from_dict(yaml.safe_load(out)).model == expected.model
