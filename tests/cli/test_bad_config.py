"""The bad-input suite, config side: every kind of mistake a user can make in a config, its
overrides, the model arguments, the data files and the command line is refused with exit
status 2, no traceback, one sentence per problem that names the problem (and the fix), every
problem at once, and an existing run directory left byte-for-byte unchanged.

Cases run the real ``bpkit`` command from a user-like working directory (``harness.user_dir``:
the shipped configs with their default relative ``runs/<name>`` directories, each of which
already holds a run). Mistakes in the config alone are refused before JAX is imported, so
each of those cases gets its own fresh process (a fraction of a second); the cases that need
the data or the model (JAX) share one process that calls ``bpkit.cli.main`` for each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from tests.cli.harness import REPO, assert_refused, run_cli, tree_digest, user_dir


@dataclass(frozen=True)
class Bad:
    id: str
    args: tuple[str, ...]      # the bpkit command line
    words: tuple[str, ...]     # the message names every one of these (case-insensitive)
    problems: int = 1          # how many problems the message lists
    jax: bool = False          # needs the data or the model (shares one process)


MLP = "configs/mnist1d_mlp.yaml"
GPT = "configs/charlm_gpt.yaml"


def train(*overrides: str, config: str = MLP) -> tuple[str, ...]:
    return ("train", config, *overrides)


CASES = [
    # --- numeric domains and types of config fields
    Bad("lr_nan", train("optimizer.learning_rate=.nan"),
        ("optimizer.learning_rate", "got nan", "finite number > 0")),
    Bad("lr_zero", train("optimizer.learning_rate=0"), ("optimizer.learning_rate", "> 0")),
    Bad("lr_inf_string", train("optimizer.learning_rate=1e999"),
        ("optimizer.learning_rate", "got inf")),
    Bad("lr_not_a_number", train("optimizer.learning_rate=fast"),
        ("optimizer.learning_rate", "'fast'", "expected a number")),
    Bad("warmup_negative", train("optimizer.warmup_steps=-10"),
        ("optimizer.warmup_steps", "got -10", "from 0")),
    Bad("label_smoothing", train("model.label_smoothing=5"),
        ("model.label_smoothing", "[0, 1)")),
    Bad("adam_b1", train("optimizer.b1=1.5"), ("optimizer.b1", "got 1.5", "[0, 1)")),
    Bad("adam_b2_negative", train("optimizer.b2=-0.1"), ("optimizer.b2", "[0, 1)")),
    Bad("momentum_one", train("optimizer.name=momentum", "optimizer.momentum=1"),
        ("optimizer.momentum", "[0, 1)")),
    Bad("eps_zero", train("optimizer.eps=0"), ("optimizer.eps", "> 0")),
    Bad("weight_decay_negative", train("optimizer.weight_decay=-0.1"),
        ("optimizer.weight_decay", ">= 0")),
    Bad("clip_norm_negative", train("optimizer.clip_norm=-1"),
        ("optimizer.clip_norm", "> 0 or null", "flip")),
    Bad("decay_rate_growth", train("optimizer.schedule=exponential", "optimizer.decay_rate=2"),
        ("optimizer.decay_rate", "(0, 1]")),
    Bad("final_fraction", train("optimizer.final_lr_fraction=-1"),
        ("optimizer.final_lr_fraction", "[0, 1]")),
    Bad("piecewise_unsorted", train("optimizer.schedule=piecewise",
                                    "optimizer.boundaries=[500,100]", "optimizer.scales=[0.1,0.1]"),
        ("optimizer.boundaries", "increase", "[100, 500]")),
    Bad("piecewise_lengths", train("optimizer.schedule=piecewise", "optimizer.boundaries=[100]",
                                   "optimizer.scales=[0.1,0.1]"),
        ("same length", "one scale per boundary")),
    Bad("piecewise_scale_zero", train("optimizer.schedule=piecewise",
                                      "optimizer.boundaries=[100]", "optimizer.scales=[0]"),
        ("optimizer.scales", "> 0")),
    Bad("boundaries_without_piecewise", train("optimizer.boundaries=[100]",
                                              "optimizer.scales=[0.1]"),
        ("optimizer.schedule=piecewise", "ignores")),
    Bad("steps_overflow", train("run.steps=100000000000"),
        ("run.steps", "2,147,483,647", "32-bit")),
    Bad("steps_zero", train("run.steps=0"), ("run.steps", "got 0")),
    Bad("steps_float", train("run.steps=1.5"), ("run.steps", "expected an integer")),
    Bad("accumulate_beyond_steps", train("run.steps=4", "optimizer.accumulate_steps=8"),
        ("optimizer.accumulate_steps", "no update", "<= run.steps")),
    Bad("seed_negative", train("run.seed=-1"), ("run.seed", "unsigned 32-bit")),
    Bad("seed_too_big", train("run.seed=4294967296"), ("run.seed", "4,294,967,295")),
    Bad("log_every_zero", train("run.log_every=0"), ("run.log_every", "from 1")),
    Bad("batch_larger_than_data", train("data.batch_size=5000"),
        ("data.batch_size", "larger than the training set", "<= 4000")),
    Bad("num_train_huge", train("data.num_train=1000000000"), ("data.num_train", "1,000,000")),
    Bad("engine_typo", train("run.engine=bpkt"), ("run.engine", "did you mean 'bpkit'")),
    Bad("bool_typo", train("run.check_parity=maybe"), ("run.check_parity", "true or false")),
    Bad("unknown_key", train("run.stpes=10"), ("run.stpes", "did you mean 'run.steps'")),
    Bad("unknown_section", train("optimiser.name=adam"), ("optimiser", "did you mean 'optimizer'")),
    Bad("ratios_swapped", train("diagnostics.vanish_ratio=10", "diagnostics.explode_ratio=1"),
        ("vanish_ratio", "explode_ratio", "swap")),
    Bad("mesh_zero", train("mesh.data=0"), ("mesh.data", "got 0")),
    Bad("distributed_partial", train("distributed.num_processes=2"),
        ("distributed", "together", "distributed.auto=true")),
    Bad("gan_with_signals", train("diagnostics.every=10", config="configs/gan_2d.yaml"),
        ("diagnostics.every", "GAN", "diagnostics.every=0")),
    Bad("unknown_encoding", train("data.encoding=klingon", config=GPT),
        ("data.encoding", "klingon", "latin-1")),
    Bad("run_name_a_path", train("run.name=../elsewhere"), ("run.name", "run.out_dir")),
    Bad("list_given_a_string", train("optimizer.freeze=head/*"),
        ("optimizer.freeze", "expected a list", "[head/*]")),
    Bad("patterns_not_strings", train("optimizer.trainable=[3]"),
        ("optimizer.trainable", "not path patterns")),
    # --- model arguments, per factory
    Bad("hidden_int_for_list", train("model.args.hidden=64"),
        ("model.args.hidden", "got 64", "list of positive integers", "[64]")),
    Bad("hidden_negative", train("model.args.hidden=[-4]"),
        ("model.args.hidden", "[-4]", "positive")),
    Bad("activation_unknown", train("model.args.activation=nosuch"),
        ("model.args.activation", "nosuch", "relu", "tanh")),
    Bad("model_arg_typo", train("model.args.hiden=[4]"),
        ("model.args.hiden", "did you mean 'model.args.hidden'")),
    Bad("model_name_typo", train("model.name=mpl"), ("model.name", "did you mean 'mlp'")),
    Bad("num_classes_huge", train("model.args.num_classes=10000000000"),
        ("model.args.num_classes", "100,000")),
    Bad("kernel_size_zero", train("model.args.kernel_size=0", config="configs/mnist1d_cnn.yaml"),
        ("model.args.kernel_size", "positive integer")),
    Bad("batch_norm_string", train("model.args.batch_norm=yes please",
                                   config="configs/mnist1d_cnn_bn.yaml"),
        ("model.args.batch_norm", "true or false")),
    Bad("gpt_heads_do_not_divide", train("model.args.n_heads=3", config=GPT),
        ("model.args.n_heads", "divide d_model=128", "n_heads=2")),
    Bad("gpt_dropout", train("model.args.dropout=1.5", config=GPT),
        ("model.args.dropout", "[0, 1)")),
    Bad("gpt_context_short", train("model.args.context=8", config=GPT),
        ("model.args.context", "data.context=64")),
    Bad("model_does_not_fit_data", train("model.name=gpt"),
        ("model.name", "gpt does not fit data.name=mnist1d", "mlp", "model.args.hidden",
         "gpt takes vocab_size"), problems=3),
    Bad("loss_does_not_fit_data", train("model.loss=mse"),
        ("model.loss", "cross_entropy")),
    Bad("residual_unknown_arg", train("model.args.hidden=[8]",
                                      config="configs/deep_residual.yaml"),
        ("model.args.hidden", "residual_mlp takes")),
    # --- several problems at once: all are listed
    Bad("nine_at_once", train(
        "optimizer.learning_rate=.nan", "optimizer.warmup_steps=-10", "model.label_smoothing=5",
        "optimizer.b1=1.5", "optimizer.schedule=piecewise", "optimizer.boundaries=[500,100]",
        "optimizer.scales=[0.1,0.1]", "optimizer.clip_norm=-1", "model.args.hidden=64",
        "model.args.activation=nosuch"),
        ("learning_rate", "warmup_steps", "label_smoothing", "b1", "boundaries", "clip_norm",
         "model.args.hidden", "model.args.activation"), problems=8),
    Bad("types_and_keys_at_once", train("run.stpes=3", "run.steps=ten", "mesh.fsdp=0",
                                        "model.args.hiden=[4]"),
        ("run.stpes", "run.steps: got 'ten'", "mesh.fsdp", "model.args.hiden"), problems=4),
    # --- config files: YAML syntax, duplicates, encoding, shape
    Bad("yaml_duplicate_key", ("train", "bad/duplicate.yaml"),
        ("duplicate.yaml:4:3", "duplicate key 'steps'", "line 3", "keep one")),
    Bad("yaml_duplicate_nested", ("train", "bad/duplicate_nested.yaml"),
        ("duplicate_nested.yaml:5:5", "duplicate key 'hidden'")),
    Bad("yaml_bad_indent", ("train", "bad/indent.yaml"), ("indent.yaml:3:9", "invalid YAML")),
    Bad("yaml_unclosed_bracket", ("train", "bad/bracket.yaml"),
        ("bracket.yaml:3:", "invalid YAML", "flow sequence")),
    Bad("yaml_tab", ("train", "bad/tab.yaml"), ("tab.yaml:2:1", "'\\t'", "spaces")),
    Bad("config_not_utf8", ("train", "bad/latin1.yaml"), ("latin1.yaml:2:12", "not UTF-8",
                                                          "save it as UTF-8")),
    Bad("config_empty", ("train", "bad/empty.yaml"), ("empty.yaml is empty", "configs/")),
    Bad("config_a_list", ("train", "bad/list.yaml"), ("list.yaml must be a mapping",
                                                      "not a list")),
    Bad("section_not_mapping", ("train", "bad/section.yaml"), ("section 'run' must be a mapping",)),
    Bad("unknown_key_in_file", ("train", "bad/typo.yaml"),
        ("run.log_evry", "did you mean 'run.log_every'")),
    Bad("config_missing", ("train", "configs/no_such.yaml"),
        ("config file not found", "configs/no_such.yaml")),
    Bad("config_is_a_directory", ("train", "configs"), ("configs is a directory",)),
    Bad("config_is_a_run_directory", ("train", "runs/mnist1d_mlp"),
        ("is a directory", "runs/mnist1d_mlp/config.yaml")),
    Bad("override_duplicate_key", train("model.args={hidden: [4], hidden: [5]}"),
        ("duplicate key 'hidden'",)),
    Bad("override_without_value", train("run.steps"), ("run.steps", "section.key=value")),
    Bad("override_into_a_value", train("run.steps.x=1"), ("run.steps", "not a mapping")),
    # --- the command line
    Bad("unknown_command", ("trian", MLP), ("unknown command 'trian'", "did you mean 'train'")),
    Bad("train_without_config", ("train",), ("CONFIG", "required")),
    Bad("unknown_flag", ("train", MLP, "--fast"), ("unrecognized arguments: --fast",)),
    Bad("config_show_bad_override", ("config", "show", MLP, "optimizer.b1=2"),
        ("optimizer.b1", "[0, 1)")),
    Bad("config_bad_action", ("config", "shwo", MLP), ("invalid choice", "show")),
    Bad("eval_not_a_run", ("eval", "configs"), ("not a run directory",)),
    Bad("parity_flag_anywhere", ("parity", MLP, "--no-fd", "run.steps=0"),
        ("run.steps: got 0",)),
    # --- data files and labels (read with the model built: JAX)
    Bad("npz_strings", train("data.name=npz", "data.path=data/strings.npz"),
        ("data.path", "strings.npz", "array 'x'", "text", "float32"), jax=True),
    Bad("npz_objects", train("data.name=npz", "data.path=data/objects.npz"),
        ("objects.npz", "array 'y'", "cannot be read", "numeric"), jax=True),
    Bad("npz_x_test_without_y_test", train("data.name=npz", "data.path=data/x_test_only.npz"),
        ("x_test_only.npz", "'x_test' but not 'y_test'", "save both"), jax=True),
    Bad("npz_not_a_zip", train("data.name=npz", "data.path=data/notzip.npz"),
        ("notzip.npz", "not an .npz file", "numpy.savez"), jax=True),
    Bad("npz_npy_file", train("data.name=npz", "data.path=data/array.npy"),
        ("array.npy", ".npy file", "numpy.savez"), jax=True),
    Bad("npz_lengths", train("data.name=npz", "data.path=data/lengths.npz"),
        ("lengths.npz", "'x' has 100 examples but 'y' has 50", "same length"), jax=True),
    Bad("npz_no_y", train("data.name=npz", "data.path=data/no_y.npz"),
        ("no_y.npz", "'x' and 'y'", "missing y"), jax=True),
    Bad("npz_three_problems", train("data.name=npz", "data.path=data/mixed.npz"),
        ("mixed.npz", "array 'x' has dtype", "'x_test' but not 'y_test'", "'y' has 50"),
        problems=3, jax=True),
    Bad("npz_label_1e10", train("data.name=npz", "data.path=data/huge_label.npz"),
        ("huge_label.npz", "10,000,000,000", "10,000,000,001 classes", "more than 100,000",
         "0 .. K-1"), jax=True),
    Bad("npz_labels_per_example", train("data.name=npz", "data.path=data/many_classes.npz"),
        ("many_classes.npz", "5,001 classes", "10 per training example"), jax=True),
    Bad("npz_negative_label", train("data.name=npz", "data.path=data/negative.npz"),
        ("negative.npz", "down to -1", "0 .. K-1"), jax=True),
    Bad("npz_labels_2d", train("data.name=npz", "data.path=data/labels2d.npz"),
        ("labels2d.npz", "'y' has shape (100, 1)", "reshape(-1)"), jax=True),
    Bad("npz_missing_test_file", train("data.name=npz", "data.path=data/lengths.npz",
                                       "data.test_path=data/nothere.npz"),
        ("data.test_path", "not found", "nothere.npz"), jax=True),
    Bad("npz_batch_larger_than_data", train("data.name=npz", "data.path=data/good.npz"),
        ("data.batch_size", "100 is larger", "80 examples", "<= 80"), jax=True),
    Bad("text_binary", train("data.path=data/binary.bin", config=GPT),
        ("data.path", "binary.bin", "NUL bytes", "binary file"), jax=True),
    Bad("text_not_utf8", train("data.path=data/latin1.txt", config=GPT),
        ("latin1.txt", "not utf-8", "byte 0xe9", "data.encoding"), jax=True),
    Bad("labels_beyond_num_classes", train("model.args.num_classes=5"),
        ("labels span [0, 9]", "5 classes", "num_classes to at least 10"), jax=True),
    Bad("features_do_not_fit", train("model.args.in_features=7"),
        ("does not fit model mlp", "(40,)"), jax=True),
    Bad("gpt_vocab_too_small", train("model.args.vocab_size=5", "data.max_chars=20000",
                                     config=GPT),
        ("distinct characters", "vocab_size is 5"), jax=True),
    Bad("npz_path_a_directory", train("data.name=npz", "data.path=data"),
        ("data.path", "is a directory"), jax=True),
    # --- freeze / trainable patterns against the model's parameters
    Bad("freeze_typo", train("optimizer.freeze=[dense_9/w]"),
        ("optimizer.freeze", "'dense_9/w' matches no parameter", "dense_0/w", "head/b"), jax=True),
    Bad("trainable_matches_nothing", train("optimizer.trainable=[hed/*]"),
        ("optimizer.trainable", "'hed/*'", "head/w"), jax=True),
    Bad("patterns_both_wrong", train("optimizer.trainable=[hed/*]", "optimizer.freeze=[x]"),
        ("'hed/*'", "'x' matches no parameter"), problems=2, jax=True),
    Bad("everything_frozen", train("optimizer.freeze=['*']"),
        ("no parameter to train", "loosen"), jax=True),
    Bad("model_too_big_for_memory", train("model.args.hidden=[1000000,1000000,1000000]"),
        ("parameters", "GiB", "smaller"), jax=True),
    # --- bpkit rules
    Bad("rules_argnums_out_of_range", ("rules", "data/two_args.py:loss", "--argnums", "7"),
        ("--argnums 7 is out of range", "takes 2 arguments", "0 .. 1"), jax=True),
    Bad("rules_argnums_not_a_number", ("rules", "data/two_args.py:loss", "--argnums", "w"),
        ("--argnums 'w'", "0,1"), jax=True),
]
FAST = [c for c in CASES if not c.jax]
SLOW_START = [c for c in CASES if c.jax]


def test_the_table_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------------- files

def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _fake_runs(work: str) -> None:
    """``runs/<name>`` of every shipped config, as a finished run leaves it (the cases must
    not touch a byte of them; nothing in them is read before the refusal)."""
    for name in os.listdir(os.path.join(work, "configs")):
        run = os.path.join(work, "runs", name[:-len(".yaml")])
        with open(os.path.join(work, "configs", name)) as f:
            _write(os.path.join(run, "config.yaml"), f.read())
        _write(os.path.join(run, "metrics.jsonl"), '{"step": 10, "split": "train", '
                                                   '"loss": 1.5}\n')
        _write(os.path.join(run, "summary.json"), '{"steps": 10}\n')
        _write(os.path.join(run, "checkpoints", "10", "meta.json"), '{"step": 10}\n')


def _data_files(work: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 40)).astype(np.float32)
    y = np.arange(100) % 3
    d = os.path.join(work, "data")
    os.makedirs(d, exist_ok=True)
    np.savez(os.path.join(d, "good.npz"), x=x, y=y)                      # 80 train / 20 test
    np.savez(os.path.join(d, "strings.npz"), x=np.array([["a"] * 40] * 100), y=y)
    np.savez(os.path.join(d, "objects.npz"), x=x, y=np.array([None] * 100, dtype=object))
    np.savez(os.path.join(d, "x_test_only.npz"), x=x, y=y, x_test=x)
    np.savez(os.path.join(d, "lengths.npz"), x=x, y=y[:50])
    np.savez(os.path.join(d, "no_y.npz"), x=x)
    np.savez(os.path.join(d, "mixed.npz"), x=np.array([["a"] * 40] * 100), y=y[:50],
             x_test=x)
    np.savez(os.path.join(d, "huge_label.npz"), x=x, y=np.where(y == 2, 10**10, y))
    np.savez(os.path.join(d, "many_classes.npz"), x=x, y=np.where(y == 2, 5000, y))
    np.savez(os.path.join(d, "negative.npz"), x=x, y=y - 1)
    np.savez(os.path.join(d, "labels2d.npz"), x=x, y=y[:, None])
    np.save(os.path.join(d, "array.npy"), x)
    _write(os.path.join(d, "notzip.npz"), "x,y\n1,2\n")
    _write(os.path.join(d, "binary.bin"), bytes(range(256)) * 64)
    _write(os.path.join(d, "latin1.txt"), "café au lait\n".encode("latin-1") * 500)
    _write(os.path.join(d, "two_args.py"),
           "import jax.numpy as jnp\n\ndef loss(w, x):\n    return jnp.sum(jnp.tanh(w * x))\n\n"
           "def example_args():\n    return jnp.ones(3), jnp.ones(3)\n")


def _config_files(work: str) -> None:
    b = os.path.join(work, "bad")
    _write(os.path.join(b, "duplicate.yaml"), "run:\n  name: dup\n  steps: 5\n  steps: 6\n")
    _write(os.path.join(b, "duplicate_nested.yaml"),
           "model:\n  name: mlp\n  args:\n    hidden: [4]\n    hidden: [8]\n")
    _write(os.path.join(b, "indent.yaml"), "run:\n  name: x\n   steps: 5\n")
    _write(os.path.join(b, "bracket.yaml"), "run:\n  name: [x\n")
    _write(os.path.join(b, "tab.yaml"), "run:\n\tname: x\n")
    _write(os.path.join(b, "latin1.yaml"), "run:\n  name: caf\xe9\n".encode("latin-1"))
    _write(os.path.join(b, "empty.yaml"), "")
    _write(os.path.join(b, "list.yaml"), "- run\n- data\n")
    _write(os.path.join(b, "section.yaml"), "run: 3\n")
    _write(os.path.join(b, "typo.yaml"), "run:\n  name: typo\n  log_evry: 5\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> str:
    work = user_dir(tmp_path_factory.mktemp("bad_config"))
    _fake_runs(work)
    _data_files(work)
    _config_files(work)
    return work


def _check(case: Bad, code: int, out: str, runs_changed: bool) -> None:
    proc = subprocess.CompletedProcess(case.args, code, out, "")
    assert_refused(proc, 2, *case.words)
    if case.problems > 1:
        assert f"{case.problems} problems" in out, out
    else:
        assert " problems; " not in out, out
    assert not runs_changed, f"{case.id}: the existing run directories changed"


# --------------------------------------------------------------------------------- cases

@pytest.mark.parametrize("case", FAST, ids=[c.id for c in FAST])
def test_config_mistake_is_refused(case: Bad, work: str):
    """One fresh ``bpkit`` process per case: refused before JAX is imported."""
    before = tree_digest(os.path.join(work, "runs"))
    p = run_cli(work, *case.args, timeout=60)
    _check(case, p.returncode, p.stdout + p.stderr,
           tree_digest(os.path.join(work, "runs")) != before)


# Runs each case's command line through bpkit.cli.main in one process, as the ``bpkit`` entry
# point would (an escaping exception is recorded with its traceback, SystemExit as its code),
# and notes whether runs/ changed.
_DRIVER = r"""
import contextlib, io, json, sys, traceback
sys.path.insert(0, sys.argv[1])
from tests.cli.harness import tree_digest
from bpkit import cli
results = {}
for case_id, args in json.loads(sys.argv[2]):
    before = tree_digest("runs")
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            code = cli.main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        buf.write(traceback.format_exc())
        code = 1
    results[case_id] = {"code": code, "out": buf.getvalue(),
                        "changed": tree_digest("runs") != before}
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def shared_process_results(work: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    payload = json.dumps([(c.id, list(c.args)) for c in SLOW_START])
    p = subprocess.run([sys.executable, "-c", _DRIVER, REPO, payload], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, (p.stdout + p.stderr)[-3000:]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("case", SLOW_START, ids=[c.id for c in SLOW_START])
def test_data_and_model_mistake_is_refused(case: Bad, shared_process_results: dict):
    r = shared_process_results[case.id]
    _check(case, r["code"], r["out"], r["changed"])


@pytest.mark.slow
def test_a_real_run_survives_every_kind_of_refusal(tmp_path):
    """A run trained at the default relative path, then one refused input of each stage (the
    config, a data file, the patterns, the YAML): each exits 2 and the run is unchanged."""
    work = user_dir(tmp_path)
    _data_files(work)
    _config_files(work)
    tiny = ("run.steps=4", "run.log_every=2", "run.checkpoint_every=2", "data.batch_size=32",
            "model.args.hidden=[8]", "run.progress=log")
    p = run_cli(work, "train", MLP, *tiny)
    assert p.returncode == 0, p.stderr[-3000:]
    run = os.path.join(work, "runs", "mnist1d_mlp")
    before = tree_digest(run)
    assert "checkpoints/4/meta.json" in before and "metrics.jsonl" in before
    refusals = [
        (("optimizer.learning_rate=.nan",), ("optimizer.learning_rate",)),
        (("data.name=npz", "data.path=data/huge_label.npz"), ("10,000,000,001 classes",)),
        (("optimizer.freeze=[dense_9/w]",), ("matches no parameter",)),
    ]
    for extra, words in refusals:
        assert_refused(run_cli(work, "train", MLP, *tiny, *extra), 2, *words)
        assert tree_digest(run) == before, extra
    assert_refused(run_cli(work, "train", "bad/duplicate.yaml", f"run.out_dir={run}"), 2,
                   "duplicate key")
    assert tree_digest(run) == before
