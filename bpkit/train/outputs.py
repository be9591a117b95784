"""What a trained model makes, drawn: the GAN's generated points against real ones
(``plots/samples.png``) and a regression model's fitted curve over the data
(``plots/fit.png``). These need the parameters: the live ones at the end of a run, or the
run directory's latest checkpoint (``restore``)."""
from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

import numpy as np


class Trained(NamedTuple):
    """A run's config, data, task and parameters (and model state, for a stateful task)."""

    cfg: Any
    ds: Any
    task: Any
    params: Any
    model_state: Any = None
    step: int = 0


def restore(run_dir: str) -> Trained | None:
    """The run's latest good checkpoint with its config, data and task; ``None`` when the
    run has no config or no usable checkpoint."""
    from bpkit.train import checkpoint as ckpt
    from bpkit.train import loop
    from bpkit.train.history import run_config
    cfg = run_config(run_dir)
    if cfg is None:
        return None
    cfg.model.init_from = None
    ds, task, tx, _ = loop.build(cfg)
    state = loop.init_state(cfg, task, tx)
    step, restored = ckpt.restore_latest(os.path.join(run_dir, "checkpoints"), state,
                                         warn=lambda m: print(m, file=sys.stderr))
    if restored is None:
        return None
    return Trained(cfg, ds, task, restored.params, restored.model_state, step)


def gan_points(trained: Trained, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``(generated (n, 2), real (n, 2))``: the generator on ``n`` fixed latent draws and
    ``n`` held-out real points (the stream the evaluation uses)."""
    import jax
    import jax.numpy as jnp

    from bpkit.data import eval_batches
    generator, _ = trained.task.model
    z = jax.random.normal(jax.random.PRNGKey(0), (n, trained.task.latent_dim), jnp.float32)
    fake = np.asarray(generator.apply(trained.params["generator"], z))
    real = np.concatenate([b["x"][b["mask"] > 0] if "mask" in b else b["x"]
                           for b in eval_batches(trained.ds, n, 1)])[:n]
    return fake, real


def regression_curve(trained: Trained, num: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """``(x grid (num,), prediction (num, ...))`` over the range of the training inputs (a
    1-D input only)."""
    from bpkit.train.tasks import _run
    x = np.asarray(trained.ds.x_train).reshape(len(trained.ds.x_train), -1)[:, 0]
    grid = np.linspace(x.min(), x.max(), num, dtype=np.float32)
    shaped = grid.reshape((num,) + tuple(trained.ds.x_train.shape[1:]))
    pred, _ = _run(trained.task.model, trained.params, shaped, state=trained.model_state)
    return grid, np.asarray(pred).reshape(num, -1)


def plot_outputs(run_dir: str, trained: Trained | None = None, *, title: str | None = None
                 ) -> list[str]:
    """``plots/samples.png`` for a GAN run, ``plots/fit.png`` for a regression run with 1-D
    inputs; ``[]`` for other runs or without a checkpoint."""
    from bpkit.train.history import read_config, run_name
    kind = _kind(read_config(run_dir))
    if kind not in ("gan", "regression"):
        return []
    trained = trained or restore(run_dir)
    if trained is None or trained.task.kind != kind:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bpkit.train.plots import style_step_title
    title = title or run_name(run_dir)
    fig, ax = plt.subplots(figsize=(5.5, 5) if kind == "gan" else (6.5, 4.2))
    if kind == "gan":
        fake, real = gan_points(trained)
        ax.scatter(real[:, 0], real[:, 1], s=5, alpha=0.35, color="tab:blue",
                   label=f"real (held-out, {len(real)})")
        ax.scatter(fake[:, 0], fake[:, 1], s=5, alpha=0.6, color="tab:orange",
                   label=f"generated ({len(fake)})")
        ax.set_aspect("equal", "datalim")
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
        name, what = "samples", f"generated vs real points at step {trained.step}"
    else:
        if np.prod(trained.ds.x_train.shape[1:]) != 1:
            plt.close(fig)
            return []
        grid, pred = regression_curve(trained)
        xs = np.asarray(trained.ds.x_test if trained.ds.x_test is not None
                        else trained.ds.x_train).reshape(-1)
        ys = np.asarray(trained.ds.y_test if trained.ds.y_test is not None
                        else trained.ds.y_train).reshape(len(xs), -1)[:, 0]
        ax.scatter(xs, ys, s=4, alpha=0.35, color="tab:blue", label=f"test data ({len(xs)})")
        ax.plot(grid, pred[:, 0], color="tab:red", lw=2, label="model")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        name, what = "fit", f"fitted curve at step {trained.step}"
    style_step_title(ax, title, what)
    ax.legend(fontsize=8, loc="best", markerscale=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _kind(raw_cfg: dict) -> str:
    """The task kind a raw config will build, from its keys alone (no JAX)."""
    model, data = raw_cfg.get("model", {}), raw_cfg.get("data", {})
    if model.get("loss") == "gan" or model.get("name") == "gan_2d":
        return "gan"
    if model.get("loss") in ("mse", "huber"):
        return "regression"
    return "lm" if data.get("name") == "text" else "classifier"
