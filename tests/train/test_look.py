"""Runs people can look at: bpkit sweep, compare, plot, report and TensorBoard events, on one
tiny two-run sweep trained once for the module (sgd vs adam, 30 steps, backward signals)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bpkit import cli
from bpkit.compare import differing_keys, run_labels, summary_table
from bpkit.config import ConfigError
from bpkit.sweep import parse_overrides, plan, split_values, sweep
from bpkit.train.history import learning_rate_curves, run_name
from bpkit.train.plots import plain_number, read_metrics
from tests.numerics import user_numerics
from tests.train.helpers import CONFIGS, TINY

MLP = os.path.join(CONFIGS, "mnist1d_mlp.yaml")
SWEEP_ARGS = ["optimizer.name=sgd,adam", *TINY, "diagnostics.every=10",
              "run.checkpoint_every=0", "optimizer.schedule=cosine", "run.peak_flops=1e12"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """``(sweep dir, [run dirs], figure, table)`` of the two-run sweep."""
    out = tmp_path_factory.mktemp("sweep")
    with user_numerics():
        return sweep(MLP, SWEEP_ARGS, str(out), echo=lambda m: None)


# ----------------------------------------------------------------------------- sweep

def test_split_values_keeps_brackets_together():
    assert split_values("0.1,[64,64],x") == ["0.1", "[64,64]", "x"]
    assert split_values("[64,64]") == ["[64,64]"]
    axes, fixed = parse_overrides(["a.b=1,2", "c.d=[1,2]", "e.f=[1],[1,2]"])
    assert axes == [("a.b", ["1", "2"]), ("e.f", ["[1]", "[1,2]"])] and fixed == ["c.d=[1,2]"]


@pytest.mark.parametrize("overrides, words", [
    (["run.steps=10"], "no key has several values"),
    (["optimizer.name=sgd,,adam"], "empty value"),
    (["optimizer.name=sgd,adam", "optimizer.name=lion,lamb"], "swept twice"),
])
def test_sweep_overrides_are_checked(overrides, words):
    with pytest.raises(ConfigError, match=words):
        parse_overrides(overrides)


def test_sweep_checks_every_combination_before_training(tmp_path):
    with pytest.raises(ConfigError) as e:
        plan(MLP, ["optimizer.learning_rate=0.1,-1,nan", "run.steps=5"], str(tmp_path))
    msg = str(e.value)
    assert "2 problem(s)" in msg and "optimizer.learning_rate=-1" in msg
    assert "optimizer.learning_rate=nan" in msg and not os.listdir(tmp_path)


def test_sweep_trains_each_combination_into_its_own_run(swept):
    sweep_dir, runs, figure, table = swept
    assert [os.path.basename(r) for r in runs] == ["optimizer.name=sgd", "optimizer.name=adam"]
    for r, opt in zip(runs, ("sgd", "adam")):
        with open(os.path.join(r, "summary.json")) as f:
            assert json.load(f)["steps"] == 30
        assert run_name(r) == f"mnist1d_mlp-optimizer.name={opt}"
    assert os.path.isfile(figure) and figure == os.path.join(sweep_dir, "compare.png")
    with open(os.path.join(sweep_dir, "compare.md")) as f:
        assert f.read().strip() == table
    header = table.splitlines()[0]
    assert "optimizer.name" in header and "eval_accuracy" in header
    assert "| sgd " in table and "| adam " in table


def test_sweep_again_keeps_finished_runs_and_records_divergence(swept, tmp_path):
    sweep_dir, runs, _, _ = swept
    said = []

    def must_not_train(cfg):
        raise AssertionError(f"trained {cfg.run.out_dir} again")

    sweep(MLP, SWEEP_ARGS, sweep_dir, echo=said.append, train=must_not_train)
    assert sum("finished; kept" in line for line in said) == 2

    from bpkit.train import loop

    def diverge(cfg):  # a run that logs two windows, then stops on a non-finite loss
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
            f.write(f"run:\n  name: {cfg.run.name}\noptimizer:\n  learning_rate: "
                    f"{cfg.optimizer.learning_rate}\n")
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w") as f:
            for step, loss in ((5, 2.0), (10, 40.0)):
                f.write(json.dumps({"step": step, "split": "train", "loss": loss}) + "\n")
        if cfg.optimizer.learning_rate > 1:
            raise loop.NonFiniteLoss("non-finite loss (nan) at step 11; stopping")

    out = tmp_path / "lr"
    _, runs2, _, table = sweep(MLP, ["optimizer.learning_rate=0.1,10", "run.steps=10"],
                               str(out), echo=said.append, train=diverge)
    with open(os.path.join(runs2[1], "status.txt")) as f:
        assert f.read().startswith("diverged: non-finite loss (nan) at step 11")
    assert "diverged" in table.splitlines()[3] and "diverged" not in table.splitlines()[2]
    said.clear()
    sweep(MLP, ["optimizer.learning_rate=0.1,10", "run.steps=10"], str(out),
          echo=said.append, train=must_not_train if False else diverge)
    assert any("diverged" in line and "kept" in line for line in said)


# ----------------------------------------------------------------------------- compare

def test_differing_keys_and_labels():
    a = {"run": {"name": "a", "out_dir": "x"}, "optimizer": {"name": "sgd", "lr": 0.1},
         "model": {"args": {"hidden": [64]}}}
    b = {"run": {"name": "b", "out_dir": "y"}, "optimizer": {"name": "adam", "lr": 0.1},
         "model": {"args": {"hidden": [64, 64]}}}
    assert differing_keys([a, b]) == ["model.args.hidden", "optimizer.name"]
    assert differing_keys([a, a]) == []


def test_compare_command_overlays_runs(swept, tmp_path, capsys):
    _, runs, _, _ = swept
    out = tmp_path / "cmp" / "both.png"
    assert cli.main(["compare", *runs, "--metric", "loss,signals", "--metric",
                     "learning_rate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert os.path.getsize(out) > 10_000 and (tmp_path / "cmp" / "both.md").is_file()
    assert printed.splitlines()[0].startswith("| run ") and "optimizer.name" in printed
    # Names carry the swept value already, so the legend does not repeat it.
    assert run_labels(runs) == ["mnist1d_mlp-optimizer.name=sgd",
                                "mnist1d_mlp-optimizer.name=adam"]
    assert "| 30 " in summary_table(runs)


@pytest.mark.parametrize("args, words", [
    (["--metric", "speed"], "'speed' is not one of"),
    ([], "not a run directory"),
])
def test_compare_user_errors(swept, tmp_path, capsys, args, words):
    runs = swept[1] if args else [str(tmp_path)]
    assert cli.main(["compare", *runs, *args, "--out", str(tmp_path / "c.png")]) == 2
    assert words in capsys.readouterr().err


def test_eval_and_plot_take_several_run_dirs(swept, capsys):
    _, runs, _, _ = swept
    with user_numerics():
        assert cli.main(["eval", *runs]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["run_dir"] for x in lines] == runs and all(x["step"] == 30 for x in lines)
    assert cli.main(["plot", *runs]) == 0
    printed = capsys.readouterr().out.split()
    assert {os.path.dirname(os.path.dirname(p)) for p in printed} == set(runs)


# ----------------------------------------------------------------------------- plots

def test_learning_rate_curve_is_the_schedule_at_every_step(swept):
    """Its mean over each logging window is what the run logged for that window."""
    run = swept[1][1]
    train, _ = read_metrics(run)
    steps, rates = learning_rate_curves(run, 30, train)["learning_rate"]
    assert list(steps) == list(range(1, 31)) and rates[0] == 0.0  # warmup from 0
    previous = 0  # windows end at each logged step (step 1 is logged alone: its signals)
    for rec in train:
        window = rates[(steps > previous) & (steps <= rec["step"])]
        previous = rec["step"]
        assert np.mean(window) == pytest.approx(rec["learning_rate"], rel=1e-5, abs=1e-9)


def test_plot_labels_titles_and_axes(swept, monkeypatch):
    """Titles name run.name (not the directory); tick labels are plain decimals; steps are
    integers; a single evaluation is a labelled point."""
    import matplotlib.figure

    from bpkit.train.plots import plot_run
    seen = {}

    def capture(fig, path, **kw):
        fig.canvas.draw()
        ax = fig.axes[0]
        title = fig._suptitle.get_text() if fig._suptitle is not None else ax.get_title()
        seen[os.path.basename(path)] = (title, [t.get_text() for t in
                                                         ax.get_yticklabels()],
                                        [t.get_text() for t in ax.get_xticklabels()],
                                        [t.get_text() for t in ax.texts])
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    run = swept[1][0]
    plot_run(run, outputs=False)
    assert {"loss.png", "accuracy.png", "learning_rate.png", "grad_norm.png",
            "gradient_flow.png"} <= set(seen)
    for name, (title, ylabels, xlabels, _) in seen.items():
        assert title.startswith("mnist1d_mlp-optimizer.name=sgd: "), title
        labels = [t for t in ylabels if t]
        assert len(labels) >= 3, (name, ylabels)
        assert not any(c in "".join(labels) for c in "$×^"), (name, labels)
        if name != "gradient_flow.png":
            assert all(t.replace(",", "").isdigit() for t in xlabels if t), (name, xlabels)


def test_plain_number_labels():
    assert [plain_number(v) for v in (0.0005, 0.2, 1.0, 2.0, 1500.0, 3e-7, 0.0)] == [
        "0.0005", "0.2", "1", "2", "1500", "3e-7", "0"]


def test_gan_and_regression_outputs_are_drawn(tmp_path):
    from bpkit.train.outputs import _kind
    assert _kind({"model": {"name": "gan_2d"}}) == "gan"
    assert _kind({"model": {"loss": "mse"}}) == "regression"
    assert _kind({"data": {"name": "text"}}) == "lm"
    assert _kind({}) == "classifier"


# ----------------------------------------------------------------------------- report

def test_report_is_one_self_contained_page(swept, capsys):
    run = swept[1][0]
    assert cli.main(["report", run]) == 0
    path = capsys.readouterr().out.strip()
    assert path == os.path.join(run, "report.html")
    with open(path) as f:
        page = f.read()
    for sid in ("summary", "samples", "plots", "signals", "parity", "config", "environment"):
        assert f'<section id="{sid}">' in page
    assert page.count('src="data:image/png;base64,') >= 5
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<td>dense_0</td>" in page and "mnist1d_mlp-optimizer.name=sgd" in page


@pytest.mark.slow
def test_report_renders_in_headless_chromium(swept, tmp_path):
    """The page opens in a real browser without a network: every image decodes, the
    sections are laid out, and the screenshot is not blank."""
    import shutil
    import subprocess
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from bpkit.report import write_report
    page = open(write_report(swept[1][1])).read()
    probe = ("<script>window.addEventListener('load',()=>{document.body.dataset.images="
             "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;"
             "document.body.dataset.height=document.body.scrollHeight;});</script>")
    probed = tmp_path / "probe.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=3000"]
    dom = subprocess.run(flags + ["--dump-dom", probed.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    images = page.count("<img ")
    assert f'data-images="{images}"' in dom, dom[:300]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1200,1600", f"--screenshot={shot}",
                            (tmp_path / "probe.html").as_uri()], capture_output=True,
                   timeout=120, check=True)
    import matplotlib.image as mpimg
    pixels = mpimg.imread(shot)[..., :3]
    assert (pixels.mean(axis=-1) < 0.5).mean() > 0.01  # text and plots drawn, not blank


# ----------------------------------------------------------------------------- TensorBoard

def _events(logdir):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(logdir, size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0,
                                                     ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def test_tensorboard_logdir_shows_every_run_of_the_sweep(swept):
    """``tensorboard --logdir <sweep>`` finds both runs' events, as its multiplexer does."""
    em = pytest.importorskip("tensorboard.backend.event_processing.plugin_event_multiplexer")
    mux = em.EventMultiplexer().AddRunsFromDirectory(swept[0])
    mux.Reload()
    assert sorted(mux.Runs()) == ["optimizer.name=adam/tb", "optimizer.name=sgd/tb"]
    for run in mux.Runs():
        acc = mux.GetAccumulator(run)
        assert [e.step for e in acc.Tensors("train/learning_rate")] == list(range(1, 31))


@pytest.mark.parametrize("exported", [False, True], ids=["written by the run", "export_run"])
def test_tensorboard_events_read_back_with_tensorboard(swept, exported):
    """Every logged metric, the schedule's learning rate at every step, the backward signals,
    the config and the plots, as TensorBoard's own event reader sees them: written during the
    run, or rebuilt from the run directory by ``export_run``."""
    from bpkit.train.tensorboard import export_run
    run = swept[1][1]
    train, ev = read_metrics(run)
    acc = _events(export_run(run) if exported else os.path.join(run, "tb"))
    tags = acc.Tags()
    if not exported:  # histograms need the parameters: only the run itself writes them
        assert {"params/head/w", "grads/dense_0/w"} <= set(tags["histograms"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.step for e in acc.Scalars("train/learning_rate")] == list(range(1, 31))
    assert [e.value for e in acc.Scalars("eval/accuracy")] == pytest.approx(
        [r["eval_accuracy"] for r in ev], rel=1e-6)
    assert "signals/dL_doutput/dense_0" in tags["scalars"]
    assert "signals/dL_dparams/head" in tags["scalars"]
    assert "train/examples_per_second" in tags["scalars"]
    assert "plots/loss" in tags["images"] and "plots/gradient_flow" in tags["images"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: mnist1d_mlp-optimizer.name=adam" in text


def test_tensorboard_histograms_and_resume_purge(tmp_path):
    from bpkit.train.tensorboard import TensorBoardLog
    params = {"dense_0": {"w": np.linspace(-1, 1, 12).reshape(3, 4), "b": np.zeros(4)}}
    log = TensorBoardLog(str(tmp_path))
    for step in range(1, 21):
        log.record({"step": step, "split": "train", "loss": float(step)})
    log.histograms(20, params, grads=params)
    log.close()
    log = TensorBoardLog(str(tmp_path), purge_step=11)  # killed after 20, resumed at 10
    for step in range(11, 16):
        log.record({"step": step, "split": "train", "loss": -float(step)})
    log.close()
    acc = _events(os.path.join(tmp_path, "tb"))
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(s, float(s)) for s in range(1, 11)] + [(s, -float(s)) for s in range(11, 16)]
    assert {"params/dense_0/w", "grads/dense_0/b"} <= set(acc.Tags()["histograms"])


# ----------------------------------------------------------------------------- progress

def test_progress_leaves_compilation_out_of_throughput_and_eta():
    from bpkit.train.progress import Progress, fmt
    now = [100.0]
    lines = []
    p = Progress(total=100, start=0, batch_size=10, mode="log", out=lines.append,
                 clock=lambda: now[0])
    p.compiling()
    now[0] += 16.0                                 # the first step: 16 s of compilation
    p.compiled(1)
    assert "compiled in 16.0 s" in lines[-1]
    now[0] += 9 * 0.5                              # 9 more steps at 0.5 s each
    rate = p.window(10, {"loss": 0.468, "accuracy": 1.0})
    assert rate == pytest.approx(9 * 10 / 4.5)
    assert lines[-1] == "step     10/100  loss 0.4680  accuracy 1.000  20 ex/s  ETA 0:00:45"
    assert [fmt(x) for x in (0.4563, 1.0, 12345.6, 1e-4, None, 3)] == [
        "0.4563", "1.000", "1.235e+04", "0.0001000", "n/a", "3"]


def test_flops_per_second_and_mfu_from_xla_cost_analysis(swept):
    """A step's FLOPs are XLA's count of the lowered step (a matmul's is 2·B·n·m, from the
    shapes); each log line's FLOP/s is that count times its steps per second, MFU that over
    run.peak_flops; the runs of the sweep log and summarise them."""
    import jax
    import jax.numpy as jnp

    from bpkit.train.progress import Progress, step_flops
    b, n, m = 8, 16, 4
    matmul = jax.jit(lambda w, x: x @ w)
    assert step_flops(matmul, jnp.ones((n, m)), jnp.ones((b, n))) == 2 * b * n * m
    assert step_flops(lambda w: w, jnp.ones(3)) is None  # not jitted: no count, no error

    now, lines = [0.0], []
    p = Progress(total=100, start=0, batch_size=10, mode="log", out=lines.append,
                 clock=lambda: now[0], peak_flops=4e9)
    p.compiling()
    p.compiled(1)
    p.flops_per_step = 1e8
    now[0] += 2.0                                  # 9 steps of 10 examples in 2 s
    metrics = {"loss": 1.0}
    p.window(10, metrics)
    assert metrics["flops_per_second"] == pytest.approx(9 * 1e8 / 2.0)
    assert metrics["mfu"] == pytest.approx(9 * 1e8 / 2.0 / 4e9)
    assert "0.4500 GFLOP/s (MFU 11.2%)" in lines[-1]

    for run in swept[1]:
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
        assert summary["flops_per_step"] > 0
        assert summary["mfu"] == pytest.approx(summary["flops_per_second"] / 1e12)
        train = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))
                 if '"split": "train"' in line]
        assert all(r["flops_per_second"] > 0 and 0 < r["mfu"] for r in train[1:])


def test_language_model_accuracy_and_sample_reach_summary_and_report(swept, tmp_path):
    """A language model's held-out next-token accuracy goes to summary.json (it was null), its
    text sample to sample.txt and the report."""
    import shutil
    from types import SimpleNamespace

    from bpkit.report import record_sample, render
    from bpkit.train.views import summary_extras
    assert summary_extras(SimpleNamespace(kind="lm"), {"accuracy": 0.5}) == {
        "eval_accuracy": 0.5}
    assert summary_extras(SimpleNamespace(kind="gan"), {"chamfer": 0.1}) == {
        "eval_accuracy": None, "eval_chamfer": 0.1}
    run = shutil.copytree(swept[1][0], tmp_path / "run", ignore=shutil.ignore_patterns(
        "checkpoints", "tb"))
    record_sample(str(run), "def f(x):\n    return <x>\n")
    page = render(str(run))
    assert "def f(x):\n    return &lt;x&gt;" in page


@pytest.mark.parametrize("argv, words", [
    (["sweep", MLP, "run.steps=10"], "no key has several values"),
    (["sweep", MLP, "optimizer.name=sgd,nadam"], "optimizer.name"),
    (["train", MLP, "model.name=nowhere.py:small_mlp"], "no file 'nowhere.py'"),
    (["report", "."], "not a run directory"),
])
def test_new_commands_refuse_user_mistakes_with_status_2(argv, words, capsys, tmp_path,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # nothing written
