"""``bpkit parity`` passes for every shipped config (small sizes through overrides)."""
import os

import pytest

from bpkit import cli
from tests.train.helpers import CONFIGS

SMALL = {
    "mnist1d_logreg": [],
    "mnist1d_mlp": ["model.args.hidden=[16,16]"],
    "mnist1d_cnn": ["model.args.channels=[4,4,4]"],
    "mnist1d_cnn_bn": ["model.args.channels=[4,4,4]"],
    "mnist1d_gru": ["model.args.hidden=8"],
    "charlm_gpt": ["data.context=4", "data.max_chars=5000", "model.args.d_model=8",
                   "model.args.n_layers=1", "model.args.n_heads=2"],
    "deep_sigmoid": ["model.args.depth=4", "model.args.width=8"],
    "deep_residual": ["model.args.depth=4", "model.args.width=8"],
    "gan_2d": ["model.args.hidden=8"],
    "finetune": ["model.args.hidden=[16,16]"],
    "regression_mse": ["model.args.hidden=[8,8]"],
    "diverging_lr": ["model.args.hidden=[16,16]"],  # parity at the initial weights
    # The application configs' parity runs in the default run in tests/apps (with the same
    # sizes, sharing the set-up with their short training runs); through the CLI: slow.
    "digits_cnn": ["model.args.channels=[8,16]"],
    "reverse_transformer": ["model.args.d_model=16", "model.args.n_layers=1",
                            "model.args.n_heads=2", "data.context=6", "data.num_train=512",
                            "data.num_test=64"],
    "ddpm_2d": ["model.args.hidden=32", "model.args.depth=2", "model.args.num_steps=20"],
    "cartpole_reinforce": ["model.args.hidden=[16]"],
    # The fine-tuning study's configs: charlm_gpt's model (its parity runs by default) on the
    # prose corpus, with LoRA adapters, or an optimizer option (l2_pull) that leaves the loss's
    # gradient as it is. LoRA's train-step parity runs by default in tests/apps; here: slow.
    **{name: ["data.context=4", "data.max_chars=5000", "model.args.d_model=8",
              "model.args.n_layers=1", "model.args.n_heads=2"]
       for name in ("charlm_finetune", "charlm_lora", "charlm_l2_pull")},
}


def test_every_shipped_config_is_covered():
    assert sorted(n[:-5] for n in os.listdir(CONFIGS) if n.endswith(".yaml")) == sorted(SMALL)


APPS = ("digits_cnn", "reverse_transformer", "ddpm_2d", "cartpole_reinforce",
        "charlm_finetune", "charlm_lora", "charlm_l2_pull")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in APPS else n
                                  for n in sorted(SMALL)])
def test_parity_passes(name, capsys):
    code = cli.main(["parity", os.path.join(CONFIGS, f"{name}.yaml"), "data.batch_size=2",
                     *SMALL[name]])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "parity OK" in out and "MISMATCH" not in out


@pytest.mark.parametrize("name", [n if n in ("charlm_gpt", "mnist1d_gru")
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(SMALL)])
def test_parity_passes_under_remat_auto(name, capsys):
    """``run.remat=auto``: the parity check compares the planned engine with jax.grad (two run
    by default: attention and layer norm, a scan; every shipped config with ``-m slow``)."""
    code = cli.main(["parity", os.path.join(CONFIGS, f"{name}.yaml"), "data.batch_size=2",
                     *SMALL[name], "run.remat=auto"])
    assert code == 0 and "parity OK" in capsys.readouterr().out


def test_a_wrong_rule_fails_parity_and_stops_training(monkeypatch, capsys, tmp_path):
    import jax
    from bpkit.engine import registry
    right = registry.vjp_rules[jax.lax.tanh_p]
    monkeypatch.setitem(registry.vjp_rules, jax.lax.tanh_p,
                        lambda ct, x, *, out, **kw: [2 * r if r is not None else r
                                                     for r in right(ct, x, out=out, **kw)])
    cfg = os.path.join(CONFIGS, "regression_mse.yaml")
    assert cli.main(["parity", cfg, "data.batch_size=4", "model.args.hidden=[8,8]"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    code = cli.main(["train", cfg, "run.steps=2", "model.args.hidden=[8,8]",
                     f"run.out_dir={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    assert code == 1
    assert "disagrees with jax.grad on the first batch" in captured.err
    assert "MISMATCH" in captured.out
