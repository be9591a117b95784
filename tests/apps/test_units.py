"""The pieces behind the application configs, checked against independent references:
CartPole's physics (Gym's equations, written out again here in NumPy), the episode masks and
returns, DDPM's schedule and sampler (exact for a known noise predictor), and the offline data
sets. (Greedy decoding: tests/apps/test_configs_learn.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpkit.data import load_digits_images
from bpkit.data.reversal import load_reversal
from bpkit.envs import cartpole, policy_gradient as pg
from bpkit.models import diffusion, policy_mlp


def _gym_step(s, a):
    """Gym's CartPole-v1 ``step`` (Euler), one state at a time, in float64."""
    x, x_dot, theta, theta_dot = s
    force = 10.0 if a == 1 else -10.0
    costheta, sintheta = np.cos(theta), np.sin(theta)
    temp = (force + 0.05 * theta_dot ** 2 * sintheta) / 1.1
    thetaacc = (9.8 * sintheta - costheta * temp) / (0.5 * (4.0 / 3.0 - 0.1 * costheta ** 2 / 1.1))
    xacc = temp - 0.05 * thetaacc * costheta / 1.1
    new = np.array([x + 0.02 * x_dot, x_dot + 0.02 * xacc, theta + 0.02 * theta_dot,
                    theta_dot + 0.02 * thetaacc])
    done = bool(abs(new[0]) > 2.4 or abs(new[2]) > 12 * 2 * np.pi / 360)
    return new, done


def test_cartpole_follows_gyms_physics_and_limits():
    rng = np.random.default_rng(0)
    states = rng.uniform(-0.2, 0.2, (6, 4)) * np.array([10, 5, 1, 5])  # some past the limits
    actions = np.array([0, 1, 0, 1, 1, 0])
    new, failed = cartpole.step(jnp.asarray(states), jnp.asarray(actions))
    for s, a, got, got_failed in zip(states, actions, np.asarray(new), np.asarray(failed)):
        want, done = _gym_step(s, a)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert got_failed == done
    start = cartpole.reset(jax.random.PRNGKey(0), 1000)
    assert start.shape == (1000, 4) and float(jnp.max(jnp.abs(start))) <= 0.05


def test_rollout_masks_and_returns():
    policy = policy_mlp(hidden=(8,))
    params = policy.init(jax.random.PRNGKey(0))  # zero head: the uniform random policy
    seeds = jnp.arange(200, dtype=jnp.int32)
    rollout = jax.jit(lambda p, s: pg.rollout(cartpole, policy.apply, p, s))
    obs, actions, alive = rollout(params, seeds)
    t = cartpole.MAX_STEPS
    assert obs.shape == (t, 200, 4) and actions.shape == alive.shape == (t, 200)
    alive = np.asarray(alive)
    assert np.all(np.diff(alive, axis=0) <= 0)  # once over, an episode stays over
    returns = np.asarray(pg.episode_returns(jnp.asarray(alive)))
    # A random policy keeps the pole up for about 22 steps (a known CartPole figure).
    assert 15 < returns.mean() < 30 and returns.max() < t
    # The episode ended where the physics failed: replay episode 0's actions in NumPy.
    s, n = np.asarray(obs[0, 0], np.float64), int(returns[0])
    for k in range(n):
        s, done = _gym_step(s, int(actions[k, 0]))
        assert done == (k == n - 1)
    g = np.asarray(pg.returns_to_go(jnp.asarray(alive[:, :3]), 0.9))
    for i in range(3):
        r = alive[:, i]
        want = [sum(0.9 ** (j - k) * r[j] for j in range(k, t)) for k in range(t)]
        np.testing.assert_allclose(g[:, i], want, rtol=1e-5)
    again = rollout(params, seeds)[2]
    np.testing.assert_array_equal(again, alive)  # episodes are functions of their seeds


def test_ddpm_schedule_and_sampler_are_exact_for_a_point_mass():
    """For data concentrated at ``mu`` the ideal noise predictor is ``(x_t - sqrt(abar_t)
    mu) / sqrt(1 - abar_t)``; with it the reverse chain must land exactly on ``mu``."""
    sched = diffusion.schedule(50)
    assert np.all(np.diff(np.asarray(sched.alpha_bar)) < 0) and float(sched.sigma[0]) == 0.0
    assert float(sched.alpha_bar[-1]) < 1e-3  # x_T is (nearly) pure noise
    mu = jnp.array([0.7, -1.3], jnp.float32)

    def ideal(params, inputs, **kw):
        x, t = inputs
        ab = sched.alpha_bar[t][:, None]
        return (x - jnp.sqrt(ab) * mu[None, :]) / jnp.sqrt(1.0 - ab)

    model = diffusion.Model(lambda key: {}, ideal)
    x = diffusion.sample(model, {}, jax.random.PRNGKey(0), 64, 2, sched)
    np.testing.assert_allclose(x, np.broadcast_to(mu, (64, 2)), atol=1e-4)
    x0 = jnp.broadcast_to(mu, (16, 2))
    loss = diffusion.noise_prediction_loss(model, {}, x0, jax.random.PRNGKey(1), sched)
    assert loss.shape == (16,) and float(jnp.max(loss)) < 1e-8


def test_offline_data_sets():
    ds = load_reversal(num_train=300, num_test=50, length=7)
    assert ds.x_train.shape == (300, 7) and ds.kind == "seq2seq"
    np.testing.assert_array_equal(ds.y_test, ds.x_test[:, ::-1])
    assert not {r.tobytes() for r in ds.x_test} & {r.tobytes() for r in ds.x_train}
    digits = load_digits_images()
    assert digits.x_train.shape == (1437, 8, 8, 1) and digits.x_test.shape == (360, 8, 8, 1)
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() == 1.0
    assert sorted(set(digits.y_test.tolist())) == list(range(10))


@pytest.mark.slow  # importing scikit-learn takes seconds
def test_digits_read_from_the_package_equal_scikit_learns_loader():
    digits = load_digits_images()
    sklearn = pytest.importorskip("sklearn.datasets")
    reference = sklearn.load_digits()  # the file read directly equals scikit-learn's loader
    all_images = np.concatenate([digits.x_train, digits.x_test]).reshape(-1, 64) * 16
    assert sorted(map(bytes, all_images.astype(np.uint8))) == \
        sorted(map(bytes, reference.data.astype(np.uint8)))
