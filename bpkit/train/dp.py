"""DP-SGD in training: ``optimizer.dp: {l2_clip: C, noise_multiplier: sigma[, delta]}``.

Each step clips every example's gradient to norm ``C`` and adds Gaussian noise to their sum
(Abadi et al. 2016): ``g = (Σ_b min(1, C/||g_b||) g_b + N(0, (sigma C)² I)) / B``. The clipped
sum comes from ``bpkit.per_example.clipped_value_and_grad`` (per-example norms without
per-example gradients, then one more backward pass seeded with the clip factors), so a step
costs about two backward passes, not B. The optimizer then runs on ``g`` as usual; the step
reports ``dp_clipped_fraction`` (examples whose gradient was clipped).

Privacy spent: with the ``dp-accounting`` package installed (optional: ``pip install
dp-accounting``), summary.json gets ``epsilon`` at ``delta`` from its RDP accountant for the
Poisson-subsampled Gaussian mechanism at sampling rate ``q = batch / examples`` over the
steps taken. bpkit draws fixed-size batches from shuffled epochs rather than Poisson samples,
the usual approximation; without the package, ``sigma``, ``q`` and the steps are reported
for an accountant of your choice.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from bpkit.per_example import clipped_value_and_grad

DEFAULT_DELTA = 1e-5


def dp_value_and_grad(loss_fn: Callable, l2_clip: float, noise_multiplier: float, *,
                      has_aux: bool = True) -> Callable:
    """``vg(params, batch, key, *model_state) -> (out, noisy clipped gradient)`` for a train
    step's ``loss_fn(params, batch, key, ...)`` that averages over the examples of ``batch``
    (every leaf's axis 0); ``out`` is ``(loss, aux)`` with ``dp_clipped_fraction`` in ``aux``
    (``has_aux=True``), else the loss."""
    def vg(params, batch, key, *model_state):
        axes = (None, 0, None) + (None,) * len(model_state)
        clipped = clipped_value_and_grad(loss_fn, l2_clip, batch_axis=axes, has_aux=has_aux)
        out, grads, norms = clipped(params, batch, key, *model_state)
        std = noise_multiplier * l2_clip / norms.shape[0]
        leaves, tree = jax.tree_util.tree_flatten(grads)
        keys = jax.random.split(jax.random.fold_in(key, 0x0D9), max(len(leaves), 1))
        noisy = [g + (std * jax.random.normal(k, g.shape, jnp.float32)).astype(g.dtype)
                 for g, k in zip(leaves, keys)]
        fraction = jnp.mean((norms > l2_clip).astype(jnp.float32))
        if has_aux:
            loss, aux = out
            out = (loss, {**aux, "dp_clipped_fraction": fraction})
        return out, jax.tree_util.tree_unflatten(tree, noisy)

    return vg


def privacy_spent(noise_multiplier: float, sampling_rate: float, steps: int,
                  delta: float = DEFAULT_DELTA) -> dict:
    """``{"noise_multiplier", "sampling_rate", "steps", "delta", "epsilon"}``; ``epsilon`` is
    ``None`` when ``dp-accounting`` is not installed (or sigma is 0: no privacy)."""
    out = {"noise_multiplier": noise_multiplier, "sampling_rate": sampling_rate,
           "steps": steps, "delta": delta, "epsilon": None, "accountant": None}
    if noise_multiplier <= 0 or steps <= 0:
        return out
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        return out
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate,
                                            dp_accounting.GaussianDpEvent(noise_multiplier)),
        steps)
    accountant = rdp.RdpAccountant()
    accountant.compose(event)
    out.update(epsilon=float(accountant.get_epsilon(delta)), accountant="dp-accounting RDP")
    return out


def _num_examples(ds) -> int:
    x = getattr(ds, "x_train", None)
    return len(x) if x is not None else 0


def describe(cfg, ds) -> str | None:
    """The start-of-run line for ``optimizer.dp`` (``None`` when off)."""
    dp = cfg.optimizer.dp
    if not dp:
        return None
    q = cfg.data.batch_size / max(_num_examples(ds), 1)
    return (f"  dp      DP-SGD: per-example clip {dp['l2_clip']:g}, noise multiplier "
            f"{dp['noise_multiplier']:g}, sampling rate {q:.4g}")


def summary(cfg, steps: int, ds) -> dict:
    """summary.json's ``dp`` entry (``{}`` when off)."""
    dp = cfg.optimizer.dp
    if not dp:
        return {}
    return {"dp": privacy_spent(float(dp["noise_multiplier"]),
                                cfg.data.batch_size / max(_num_examples(ds), 1), steps,
                                float(dp.get("delta", DEFAULT_DELTA)))}
