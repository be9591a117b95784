"""Toy sets: 2-D distributions for the GAN and a 1-D regression curve for MSE."""
from __future__ import annotations

import functools

import numpy as np

from bpkit.data.batching import Dataset


def sample_toy2d(rng: np.random.Generator, n: int, distribution: str = "ring",
                 noise: float = 0.1) -> np.ndarray:
    """``n`` points (n, 2) float32 from a ring of 8 Gaussians, a 5x5 grid, two moons, or a
    spiral."""
    if distribution == "ring":
        angle = 2 * np.pi * rng.integers(0, 8, n) / 8
        centers = 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1)
        pts = centers + noise * rng.standard_normal((n, 2))
    elif distribution == "grid":
        centers = rng.integers(-2, 3, (n, 2)).astype(np.float64)
        pts = centers + noise * rng.standard_normal((n, 2))
    elif distribution == "moons":
        t = np.pi * rng.random(n)
        upper = rng.random(n) < 0.5
        pts = np.where(upper[:, None], np.stack([np.cos(t), np.sin(t)], 1),
                       np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1))
        pts = pts + noise * rng.standard_normal((n, 2))
    elif distribution == "spiral":
        t = np.sqrt(rng.random(n)) * 3 * np.pi
        pts = np.stack([t * np.cos(t), t * np.sin(t)], 1) / 3
        pts = pts + noise * rng.standard_normal((n, 2))
    else:
        raise ValueError(f"unknown distribution {distribution!r}; expected ring, grid, moons "
                         "or spiral")
    return pts.astype(np.float32)


def load_toy2d(distribution: str = "ring", noise: float = 0.1) -> Dataset:
    sampler = functools.partial(_sampler, distribution=distribution, noise=noise)
    return Dataset("toy2d", "sampler", sampler=sampler, info={"distribution": distribution})


def _sampler(rng, n, *, distribution, noise):
    return sample_toy2d(rng, n, distribution, noise)


def load_regression1d(num_train: int = 4000, num_test: int = 1000, noise: float = 0.1,
                      seed: int = 0) -> Dataset:
    """``y = sin(3x) + 0.3 x + noise`` for ``x`` uniform in [-2, 2]; x and y are (N, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (num_train + num_test, 1))
    y = np.sin(3 * x) + 0.3 * x + noise * rng.standard_normal(x.shape)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return Dataset("regression1d", "regression", x[:num_train], y[:num_train], x[num_train:],
                   y[num_train:])
