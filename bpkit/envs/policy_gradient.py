"""Policy-gradient training on a pure-JAX environment: batched rollouts under ``lax.scan``
and the REINFORCE loss with a baseline (Williams 1992).

A policy maps observations ``(B, obs_dim)`` to action logits ``(B, num_actions)``. Episodes
are identified by integer seeds: episode ``i`` draws its start state and its action noise from
``PRNGKey(seed_i)`` alone, so a batch of seeds is a batch of (reproducible) episodes.

With ``alive_t`` = 1 while the episode runs (the failing step included), rewards ``r_t =
alive_t``, discounted returns-to-go ``G_t = r_t + gamma G_{t+1}``, and the baseline ``b_t``
= the mean of ``G_t`` over the batch's episodes still running at ``t``, the loss is::

    A_t  = (G_t - b_t) / std(G - b)            over running steps; a constant (no gradient)
    loss = -sum_{t,i} alive_t,i A_t,i log pi(a_t,i | s_t,i) / sum_{t,i} alive_t,i

whose gradient is the REINFORCE estimate of ``-grad E[return]``. The rollout runs on
``stop_gradient(params)``: actions are sampled, not differentiated; only the log-probabilities
of the taken actions carry the gradient (recomputed on all visited states in one batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bpkit.nn import losses

DISCOUNT = 0.99


def rollout(env, policy_apply, params, seeds, *, greedy: bool = False):
    """Run ``len(seeds)`` episodes of ``env.MAX_STEPS`` steps (one ``lax.scan``).

    Returns ``obs (T, B, obs_dim)`` (the state each action was taken in), ``actions (T, B)``
    int32 and ``alive (T, B)`` (1 while the episode runs; steps after it ended are simulated
    but masked). ``greedy``: take the most likely action instead of sampling. The simulation
    runs in the dtype of the policy's parameters."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    keys = jax.vmap(jax.random.PRNGKey)(seeds)                       # one key per episode
    reset_keys, action_keys = jnp.split(jax.vmap(jax.random.split)(keys), 2, axis=1)
    state = jax.vmap(lambda k: env.reset(k, 1, dtype)[0])(reset_keys[:, 0])  # (B, obs_dim)

    def body(carry, t):
        state, alive = carry                                          # (B, obs_dim), (B,)
        logits = policy_apply(params, state)                          # (B, num_actions)
        if greedy:
            action = jnp.argmax(logits, axis=-1)
        else:
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(action_keys[:, 0])
            action = jax.vmap(jax.random.categorical)(step_keys, logits)
        action = action.astype(jnp.int32)
        new_state, failed = env.step(state, action)
        return (new_state, alive & ~failed), (state, action, alive)

    start = (state, jnp.ones(state.shape[:1], bool))
    _, (obs, actions, alive) = lax.scan(body, start, jnp.arange(env.MAX_STEPS))
    return obs, actions, alive.astype(dtype)


def episode_returns(alive):
    """Undiscounted return of each episode, ``(B,)``: its number of steps."""
    return jnp.sum(alive, axis=0)


def returns_to_go(alive, discount: float = DISCOUNT):
    """``G_t = r_t + discount * G_{t+1}`` with ``r_t = alive_t``: ``(T, B)`` (reverse scan)."""
    def body(after, reward):
        g = reward + discount * after
        return g, g
    _, g = lax.scan(body, jnp.zeros_like(alive[0]), alive, reverse=True)
    return g


def reinforce_loss(env, policy_apply, params, seeds, discount: float = DISCOUNT):
    """``(loss, mean episode return)`` for the episodes of ``seeds`` (module docstring)."""
    obs, actions, alive = rollout(env, policy_apply, lax.stop_gradient(params), seeds)
    g = returns_to_go(alive, discount)                                     # (T, B)
    running = jnp.maximum(jnp.sum(alive, axis=1, keepdims=True), 1.0)       # (T, 1)
    advantage = (g - jnp.sum(alive * g, axis=1, keepdims=True) / running) * alive
    count = jnp.maximum(jnp.sum(alive), 1.0)
    std = jnp.sqrt(jnp.sum(jnp.square(advantage)) / count)
    advantage = lax.stop_gradient(advantage / (std + 1e-8))
    t, b = actions.shape
    logits = policy_apply(params, obs.reshape(t * b, -1))                   # (T B, actions)
    log_prob = -losses.softmax_cross_entropy(logits, actions.reshape(-1)).reshape(t, b)
    loss = -jnp.sum(alive * advantage * log_prob) / count
    return loss, jnp.mean(episode_returns(alive))
