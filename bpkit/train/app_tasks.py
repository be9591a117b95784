"""Tasks beyond classification and language modelling, one builder per model factory:

==========================  =========  =======================================================
model.name                  task kind  loss / evaluation metrics (per held-out example)
==========================  =========  =======================================================
seq2seq_transformer         seq2seq    teacher-forced cross-entropy / ``loss``,
                                       ``token_accuracy``, ``accuracy`` (exact match of the
                                       greedy decoding: the whole target right)
ddpm_mlp                    diffusion  noise-prediction MSE (DDPM) / ``loss`` (the same, at
                                       fixed draws), ``chamfer`` (samples from the reverse chain
                                       against held-out points, as the GAN's)
policy_mlp                  policy     REINFORCE with a baseline on ``data.name=cartpole``
                                       episodes / ``return`` (sampled actions),
                                       ``greedy_return``, ``loss`` = 1 - return / max return
==========================  =========  =======================================================

``build_task`` (bpkit/train/tasks.py) hands ``model.name`` in ``BUILDERS`` to its builder,
``builder(cfg, name, factory, args, dataset) -> Task``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bpkit.config import ConfigError
from bpkit.train.tasks import Task, _fill, _labels_loss, chamfer_distance


def _needs(ds, kind: str, name: str, data_names: str, cfg) -> None:
    if ds.kind != kind:
        raise ConfigError(f"model {name} needs {kind} data ({data_names}), not "
                          f"data.name={cfg.data.name}; set data.name accordingly")


def seq2seq_task(cfg, name, fn, args, ds) -> Task:
    """Encoder-decoder training with teacher forcing; evaluation decodes greedily."""
    from bpkit.models.seq2seq import greedy_decode, shift_right
    _needs(ds, "seq2seq", name, "data.name=reverse", cfg)
    if cfg.model.loss != "cross_entropy":
        raise ConfigError(f"model.loss: {cfg.model.loss!r} does not fit {name}; use "
                          "cross_entropy")
    args = _fill(fn, args, vocab_size=len(ds.vocab), context=ds.context)
    model = fn(**args)
    bos = args.get("vocab_size", len(ds.vocab))
    ce = _labels_loss(cfg)

    def loss_fn(params, batch, key):
        x, y = batch["x"], batch["y"]                                       # (B, S), (B, T)
        logits = model.apply(params, (x, shift_right(y, bos)), key=key, train=True)
        right = (jnp.argmax(logits, -1) == y).astype(jnp.float32)          # (B, T)
        return jnp.mean(ce(logits, y)), {"token_accuracy": jax.lax.stop_gradient(
            jnp.mean(right))}

    def metric_fn(params, batch):
        x, y = batch["x"], batch["y"]
        logits = model.apply(params, (x, shift_right(y, bos)))             # (B, T, V)
        decoded = greedy_decode(model, params, x, y.shape[1])               # (B, T)
        return {"loss": jnp.mean(ce(logits, y), -1),
                "token_accuracy": jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32),
                                           -1),
                "accuracy": jnp.all(decoded == y, -1).astype(jnp.float32)}

    return Task("seq2seq", model, model.init, loss_fn, metric_fn, model_args=args)


def diffusion_task(cfg, name, fn, args, ds) -> Task:
    """A DDPM on sampled points (the GAN's 2-D distributions): the loss regresses the noise;
    evaluation samples one point per held-out point from the reverse chain (fixed key) and
    reports the GAN's chamfer distance, so the two generative models compare directly."""
    from bpkit.models import diffusion
    _needs(ds, "sampler", name, "data.name=toy2d", cfg)
    if cfg.model.loss != "mse":
        raise ConfigError(f"model.loss: {cfg.model.loss!r} does not fit {name} (it regresses "
                          "the noise); use mse")
    model = fn(**args)
    sched = diffusion.schedule(args.get("num_steps", _default(fn, "num_steps")))
    data_dim = args.get("data_dim", _default(fn, "data_dim"))

    def loss_fn(params, batch, key):
        return jnp.mean(diffusion.noise_prediction_loss(model, params, batch["x"], key,
                                                        sched)), {}

    def metric_fn(params, batch):
        x = batch["x"]                                                       # (B, D)
        generated = diffusion.sample(model, params, jax.random.PRNGKey(0), x.shape[0],
                                     data_dim, sched)
        return {"loss": diffusion.noise_prediction_loss(model, params, x,
                                                        jax.random.PRNGKey(1), sched),
                "chamfer": chamfer_distance(generated, x)}

    return Task("diffusion", model, model.init, loss_fn, metric_fn, model_args=args)


def policy_gradient_task(cfg, name, fn, args, ds) -> Task:
    """REINFORCE with a baseline (bpkit/envs/policy_gradient.py): each batch is a batch of
    episode seeds; the loss rolls the episodes out under ``lax.scan`` with the current policy
    and weighs the taken actions' log-probabilities by their advantages. Evaluation plays the
    held-out seeds with sampled and with greedy actions."""
    from bpkit.envs import ENVS, policy_gradient as pg
    _needs(ds, "env", name, "data.name=cartpole", cfg)
    if cfg.model.loss != "reinforce":
        raise ConfigError(f"model.loss: {cfg.model.loss!r} does not fit {name}; use reinforce")
    env = ENVS[ds.info["env"]]
    args = _fill(fn, args, obs_dim=env.OBS_DIM, num_actions=env.NUM_ACTIONS)
    model = fn(**args)

    def loss_fn(params, batch, key):
        loss, mean_return = pg.reinforce_loss(env, model.apply, params, batch["x"])
        return loss, {"return": jax.lax.stop_gradient(mean_return)}

    def metric_fn(params, batch):
        sampled = pg.episode_returns(pg.rollout(env, model.apply, params, batch["x"])[2])
        greedy = pg.episode_returns(pg.rollout(env, model.apply, params, batch["x"],
                                                greedy=True)[2])
        return {"loss": 1.0 - sampled / env.MAX_STEPS, "return": sampled,
                "greedy_return": greedy}

    return Task("policy", model, model.init, loss_fn, metric_fn, model_args=args)


def _default(fn, arg: str):
    import inspect
    return inspect.signature(fn).parameters[arg].default


BUILDERS = {"seq2seq_transformer": seq2seq_task, "ddpm_mlp": diffusion_task,
            "policy_mlp": policy_gradient_task}
