"""bpkit.validate's tables stay in step with the code they describe, and ``config show``."""
import dataclasses
import inspect
import os
import subprocess
import sys
import typing

import yaml

from bpkit import config as config_mod
from bpkit import models, nn
from bpkit import validate
from bpkit.config import config_from_dict, load_config
from bpkit.config_show import field_comments, render
from tests.train.helpers import CONFIGS, REPO


def _numeric(tp) -> bool:
    args = typing.get_args(tp) or (tp,)
    return any(a in (int, float) for a in args)


def test_every_numeric_field_has_a_domain():
    numeric = {f"{name}.{f}" for name, cls in config_mod._SECTION_CLASSES.items()
               for f, tp in typing.get_type_hints(cls).items() if _numeric(tp)}
    assert numeric == set(validate.DOMAINS)


def test_every_default_is_in_its_domain():
    cfg = config_from_dict({})
    for key, domain in validate.DOMAINS.items():
        section, name = key.split(".")
        assert domain.contains(getattr(getattr(cfg, section), name)), key


def test_model_schema_matches_the_factories():
    for name, schema in validate.MODEL_ARGS.items():
        params = inspect.signature(getattr(models, name)).parameters
        assert list(schema) == list(params), name
        for key, arg in schema.items():
            default = params[key].default
            expected = None if default is inspect.Parameter.empty else default
            assert arg.default == expected, (name, key)
    assert validate.ACTIVATIONS == tuple(nn.ACTIVATIONS)
    for alias, target in validate.ALIASES.items():
        assert target in validate.MODEL_ARGS, alias


def test_every_config_field_has_a_comment():
    for name, cls in config_mod._SECTION_CLASSES.items():
        comments = field_comments(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)]
        assert not missing, f"{name}: {missing} have no comment in bpkit/config.py"


def test_config_show_round_trips_every_shipped_config():
    for name in sorted(os.listdir(CONFIGS)):
        cfg = load_config(os.path.join(CONFIGS, name), ["run.steps=7"])
        text = render(cfg, name)
        again = config_from_dict(yaml.safe_load(text))
        assert again.to_dict() == {**cfg.to_dict(), "run": {**cfg.to_dict()["run"],
                                                           "out_dir": cfg.out_dir}}, name
        body = [line for line in text.splitlines() if line.startswith("  ")
                and not line.strip().startswith("#")]
        assert all(" # " in line for line in body), name   # every key has its comment


def test_errors_before_jax_and_version_do_not_import_jax():
    """The user-error fast path: config mistakes and --version never import JAX."""
    code = ("import sys\nfrom bpkit import cli\n"
            "assert cli.main(['train', 'configs/mnist1d_mlp.yaml', 'run.steps=0']) == 2\n"
            "assert cli.main(['config', 'show', 'configs/mnist1d_mlp.yaml']) == 0\n"
            "print('JAX' if 'jax' in sys.modules else 'NOJAX')\n")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("NOJAX"), p.stdout[-500:]
    assert "run.steps: got 0" in p.stderr


def test_trainable_and_frozen_counts_follow_the_patterns():
    from bpkit.data import dataset_from_config
    from bpkit.train.tasks import build_task
    import jax
    cfg = load_config(os.path.join(CONFIGS, "finetune.yaml"), ["model.args.hidden=[4]"])
    task = build_task(cfg, dataset_from_config(cfg.data))
    params = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    head = 4 * 10 + 10                     # trainable: ["head/*"]; w (4, 10) and b (10,)
    frozen = 40 * 4 + 4                    # dense_0: w (40, 4) and b (4,)
    assert validate.param_counts(cfg, task, params) == (head, frozen)
    assert validate.describe_params(cfg, task, params) == (
        f"{head + frozen:,} parameters, {head:,} trainable and {frozen:,} frozen")
    validate.check_task(cfg, dataset_from_config(cfg.data), task)  # the patterns match
