"""CartPole in pure JAX (Barto, Sutton & Anderson 1983; the constants and rules of Gym's
``CartPole-v1`` and gymnax's ``CartPole-v1``): batched, jittable, steppable under ``lax.scan``.

State ``s = (x, x_dot, theta, theta_dot)``: cart position (m) and velocity, pole angle from
upright (rad) and angular velocity. Action ``a`` in {0, 1} pushes the cart with force
``F = -10 N`` or ``+10 N``. With gravity ``g = 9.8``, cart mass ``m_c = 1.0``, pole mass
``m_p = 0.1``, pole half-length ``l = 0.5`` and ``M = m_c + m_p``, the equations of motion
(frictionless) are::

    temp      = (F + m_p l theta_dot^2 sin(theta)) / M
    theta_acc = (g sin(theta) - cos(theta) temp) / (l (4/3 - m_p cos(theta)^2 / M))
    x_acc     = temp - m_p l theta_acc cos(theta) / M

integrated by explicit Euler with ``tau = 0.02 s``, positions first from the old velocities::

    x += tau x_dot;  x_dot += tau x_acc;  theta += tau theta_dot;  theta_dot += tau theta_acc

An episode starts from each state variable uniform in [-0.05, 0.05], earns reward 1 for every
step taken (the failing step included), and ends when ``|x| > 2.4``, ``|theta| > 12 degrees``,
or after ``MAX_STEPS = 500`` steps: the return is the number of steps the pole stayed up,
at most 500.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
TOTAL_MASS = MASS_CART + MASS_POLE
HALF_LENGTH = 0.5
POLE_MASS_LENGTH = MASS_POLE * HALF_LENGTH
FORCE = 10.0
TAU = 0.02
THETA_LIMIT = 12 * 2 * math.pi / 360
X_LIMIT = 2.4
MAX_STEPS = 500
OBS_DIM = 4
NUM_ACTIONS = 2


def reset(key, n: int, dtype=jnp.float32):
    """``n`` initial states ``(n, 4)``, each variable uniform in [-0.05, 0.05]."""
    return jax.random.uniform(key, (n, OBS_DIM), dtype, -0.05, 0.05)


def step(state, action):
    """One Euler step of the physics for states ``(B, 4)`` and actions ``(B,)`` in {0, 1}:
    ``(next_state (B, 4), failed (B,) bool)`` (``failed``: the cart or pole left its limits)."""
    x, x_dot, theta, theta_dot = (state[:, i] for i in range(OBS_DIM))
    force = jnp.where(action == 1, FORCE, -FORCE).astype(state.dtype)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    temp = (force + POLE_MASS_LENGTH * jnp.square(theta_dot) * sin) / TOTAL_MASS
    theta_acc = (GRAVITY * sin - cos * temp) / (
        HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * jnp.square(cos) / TOTAL_MASS))
    x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos / TOTAL_MASS
    new = jnp.stack([x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot,
                     theta_dot + TAU * theta_acc], axis=1)
    failed = (jnp.abs(new[:, 0]) > X_LIMIT) | (jnp.abs(new[:, 2]) > THETA_LIMIT)
    return new, failed
