"""Feed-forward layers: dense, convolution, pooling, reshaping, activations, dropout,
normalisation, embeddings. Every factory returns a ``bpkit.nn.Layer`` (see ``bpkit.nn.core``);
shapes in the docstrings are batched, ``B`` the batch axis.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.nn import initializers

from bpkit import ops
from bpkit.nn import activations as act
from bpkit.nn.core import Layer, shape_error, stateless
from bpkit.ops.conv import shifted_conv_is_faster

Initializer = Callable


def _lead(x, v):
    """``v`` (shape ``(d,)``) reshaped to broadcast against ``x`` (``(..., d)``) at equal rank."""
    return v.reshape((1,) * (x.ndim - v.ndim) + v.shape)


def _tuple(v, n: int, what: str, name: str) -> tuple:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    if len(v) != n or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{name}: {what} must be an int or a tuple of {n} ints, got {v!r}.")
    return v


# ---------------------------------------------------------------------------------- dense
def dense(out_features: int, *, in_features: int | None = None, use_bias: bool = True,
          w_init: Initializer | None = None, b_init: Initializer = initializers.zeros,
          name: str = "dense") -> Layer:
    """Affine map of the last axis: ``y = x W + b``.

    x ``(..., in)`` -> y ``(..., out)``; params ``w (in, out)`` (default LeCun normal, i.e.
    variance ``1/in``), ``b (out,)``. ``in_features``, if given, is checked against the input.
    """
    w_init = w_init or initializers.lecun_normal()

    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) < 1:
            raise shape_error(name, f"needs inputs with a feature axis, got per-example shape "
                              f"{tuple(in_shape)}.")
        d_in = in_shape[-1]
        if in_features is not None and d_in != in_features:
            raise shape_error(name, f"declared in_features={in_features} but the input has "
                              f"{d_in} features (per-example shape {tuple(in_shape)}).")
        kw, kb = jax.random.split(key)
        params = {"w": w_init(kw, (d_in, out_features), dtype)}
        if use_bias:
            params["b"] = b_init(kb, (out_features,), dtype)
        return params, tuple(in_shape[:-1]) + (out_features,)

    def forward(params, x, *, key=None, train=False):
        y = jnp.matmul(x, params["w"])  # (..., out)
        return y + _lead(y, params["b"]) if use_bias else y

    return Layer(name, init, forward)


# ---------------------------------------------------------------------------- convolution
def _conv(nd: int, out_channels: int, kernel_size, *, stride=1, padding="SAME", dilation=1,
          groups: int = 1, use_bias: bool = True, w_init=None, fused: bool = True,
          name: str) -> Layer:
    kernel = _tuple(kernel_size, nd, "kernel_size", name)
    strides = _tuple(stride, nd, "stride", name)
    dilations = _tuple(dilation, nd, "dilation", name)
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{name}: padding must be 'SAME', 'VALID', an int or a sequence of "
                             f"(low, high) pairs; got {padding!r}.")
        pad = padding.upper()
    elif isinstance(padding, int):
        pad = [(padding, padding)] * nd
    else:
        pad = [tuple(p) for p in padding]
    w_init = w_init or initializers.he_normal()
    spatial = "HW"[:nd] if nd == 2 else "W"
    dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")

    def conv(params, x):
        if fused and groups == 1 and shifted_conv_is_faster(params["w"].shape):
            return ops.conv(x, params["w"], strides=strides, padding=pad, dilation=dilations)
        return lax.conv_general_dilated(x, params["w"], window_strides=strides, padding=pad,
                                        rhs_dilation=dilations, dimension_numbers=dn,
                                        feature_group_count=groups)

    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) != nd + 1:
            want = "(W, C)" if nd == 1 else "(H, W, C)"
            raise shape_error(name, f"expects per-example inputs {want}, got {tuple(in_shape)}.")
        c_in = in_shape[-1]
        if c_in % groups or out_channels % groups:
            raise shape_error(name, f"groups={groups} must divide both the input channels "
                              f"({c_in}) and out_channels ({out_channels}).")
        for size, k, d in zip(in_shape[:-1], kernel, dilations):
            if pad == "VALID" and (k - 1) * d + 1 > size:
                raise shape_error(name, f"kernel {kernel} (dilation {dilations}) is larger than "
                                  f"the input {tuple(in_shape[:-1])} with padding='VALID'.")
        kw, kb = jax.random.split(key)
        params = {"w": w_init(kw, kernel + (c_in // groups, out_channels), dtype)}
        if use_bias:
            params["b"] = initializers.zeros(kb, (out_channels,), dtype)
        out = jax.eval_shape(lambda p, x: conv(p, x), params,
                             jax.ShapeDtypeStruct((1,) + tuple(in_shape), dtype))
        return params, tuple(out.shape[1:])

    def forward(params, x, *, key=None, train=False):
        y = conv(params, x)  # (B, *spatial_out, out_channels)
        return y + _lead(y, params["b"]) if use_bias else y

    return Layer(name, init, forward)


def conv1d(out_channels: int, kernel_size: int, *, stride: int = 1, padding="SAME",
           dilation: int = 1, groups: int = 1, use_bias: bool = True, w_init=None,
           fused: bool = True, name: str = "conv1d") -> Layer:
    """1-D convolution (cross-correlation), channels last.

    ``y[b, i, o] = b_o + sum_{k, c} x[b, i*s + k*dil - pad, c] w[k, c, o]`` (within a group).
    x ``(B, W, C_in)`` -> ``(B, W_out, C_out)``; w ``(K, C_in/groups, C_out)`` (He normal).
    padding: 'SAME', 'VALID', an int, or ``[(lo, hi)]``. ``fused``: see ``conv2d``.
    """
    return _conv(1, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, use_bias=use_bias, w_init=w_init, fused=fused, name=name)


def conv2d(out_channels: int, kernel_size, *, stride=1, padding="SAME", dilation=1,
           groups: int = 1, use_bias: bool = True, w_init=None, fused: bool = True,
           name: str = "conv2d") -> Layer:
    """2-D convolution (cross-correlation), NHWC.

    x ``(B, H, W, C_in)`` -> ``(B, H_out, W_out, C_out)``; w ``(KH, KW, C_in/groups, C_out)``
    (He normal), b ``(C_out,)``. stride/dilation: int or pair; padding: 'SAME', 'VALID', an
    int, or ``[(lo, hi), (lo, hi)]``. ``fused=True`` (and ``groups=1``) trains a kernel of at
    most 27 taps (``KH KW C_in``: a 3x3 RGB or a 5x5 grayscale input layer) with
    ``bpkit.ops.conv``, whose forward runs as shifted multiply-adds, on CPU (there XLA's
    convolution is slow on such short windows: 2.6 against 0.3 ms for a 3x3 one-channel
    layer); ``False``, or any other kernel or backend, is ``lax.conv_general_dilated``.
    """
    return _conv(2, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, use_bias=use_bias, w_init=w_init, fused=fused, name=name)


# -------------------------------------------------------------------------------- pooling
def _pool(nd: int, kind: str, window, stride, padding: str, name: str) -> Layer:
    win = _tuple(window, nd, "window", name)
    strides = _tuple(stride if stride is not None else window, nd, "stride", name)
    if padding.upper() not in ("SAME", "VALID"):
        raise ValueError(f"{name}: padding must be 'SAME' or 'VALID', got {padding!r}.")
    dims, strd = (1,) + win + (1,), (1,) + strides + (1,)

    def pool(x):
        # numpy (concrete) initial values, so that lax picks reduce_window_max / _sum.
        if kind == "max":
            return lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, dims, strd,
                                     padding.upper())
        total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, dims, strd, padding.upper())
        return total / math.prod(win)  # padded positions count as zeros

    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) != nd + 1:
            want = "(W, C)" if nd == 1 else "(H, W, C)"
            raise shape_error(name, f"expects per-example inputs {want}, got {tuple(in_shape)}.")
        if padding.upper() == "VALID" and any(w > s for w, s in zip(win, in_shape[:-1])):
            raise shape_error(name, f"window {win} is larger than the input "
                              f"{tuple(in_shape[:-1])} with padding='VALID'.")
        out = jax.eval_shape(pool, jax.ShapeDtypeStruct((1,) + tuple(in_shape), dtype))
        return {}, tuple(out.shape[1:])

    def forward(params, x, *, key=None, train=False):
        return pool(x)

    return Layer(name, init, forward)


def max_pool1d(window: int = 2, stride: int | None = None, padding: str = "VALID",
               name: str = "max_pool1d") -> Layer:
    """``y[b, i, c] = max_{k < window} x[b, i*stride + k, c]``; (B, W, C) -> (B, W', C)."""
    return _pool(1, "max", window, stride, padding, name)


def avg_pool1d(window: int = 2, stride: int | None = None, padding: str = "VALID",
               name: str = "avg_pool1d") -> Layer:
    """``y[b, i, c] = mean_{k < window} x[b, i*stride + k, c]``; (B, W, C) -> (B, W', C)."""
    return _pool(1, "avg", window, stride, padding, name)


def max_pool2d(window=2, stride=None, padding: str = "VALID", name: str = "max_pool2d") -> Layer:
    """Max over ``window`` patches (stride defaults to the window).
    (B, H, W, C) -> (B, H', W', C)."""
    return _pool(2, "max", window, stride, padding, name)


def avg_pool2d(window=2, stride=None, padding: str = "VALID", name: str = "avg_pool2d") -> Layer:
    """Mean over ``window`` patches (stride defaults to the window); (B, H, W, C) -> (B, H', W', C).
    With 'SAME' padding, padded positions count as zeros in the mean."""
    return _pool(2, "avg", window, stride, padding, name)


def global_avg_pool(name: str = "global_avg_pool") -> Layer:
    """Mean over all spatial axes: ``(B, *spatial, C) -> (B, C)``."""
    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) < 2:
            raise shape_error(name, f"expects (*spatial, C) per example, got {tuple(in_shape)}.")
        return {}, (in_shape[-1],)

    def forward(params, x, *, key=None, train=False):
        return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))  # (B, C)

    return Layer(name, init, forward)


def flatten(name: str = "flatten") -> Layer:
    """``(B, d1, d2, ...) -> (B, d1 * d2 * ...)``."""
    def init(key, in_shape, dtype=jnp.float32):
        return {}, (math.prod(in_shape),)

    def forward(params, x, *, key=None, train=False):
        return x.reshape(x.shape[0], -1)

    return Layer(name, init, forward)


def reshape(shape: Sequence[int], name: str = "reshape") -> Layer:
    """``(B, *in_shape) -> (B, *shape)`` (per-example sizes must match)."""
    shape = tuple(shape)

    def init(key, in_shape, dtype=jnp.float32):
        if math.prod(shape) != math.prod(in_shape):
            raise shape_error(name, f"cannot reshape per-example {tuple(in_shape)} into {shape}.")
        return {}, shape

    def forward(params, x, *, key=None, train=False):
        return x.reshape((x.shape[0],) + shape)

    return Layer(name, init, forward)


# ---------------------------------------------------------------------------- activations
ACTIVATIONS: dict[str, Callable] = {
    "relu": act.relu, "leaky_relu": act.leaky_relu, "elu": act.elu, "gelu": act.gelu,
    "gelu_exact": act.gelu_exact, "silu": act.silu, "tanh": act.tanh, "sigmoid": act.sigmoid,
    "softplus": act.softplus, "identity": act.identity,
}


def activation(kind: str | Callable, name: str | None = None) -> Layer:
    """An elementwise activation layer by name (see ``ACTIVATIONS``) or function."""
    if callable(kind):
        return stateless(name or getattr(kind, "__name__", "activation"), kind)
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}; choose one of {sorted(ACTIVATIONS)}.")
    return stateless(name or kind, ACTIVATIONS[kind])


def relu(name: str = "relu") -> Layer:
    """``max(x, 0)``."""
    return stateless(name, act.relu)


def leaky_relu(negative_slope: float = 0.01, name: str = "leaky_relu") -> Layer:
    """``x`` if ``x >= 0`` else ``negative_slope * x``."""
    return stateless(name, lambda x: act.leaky_relu(x, negative_slope))


def elu(alpha: float = 1.0, name: str = "elu") -> Layer:
    """``x`` if ``x > 0`` else ``alpha (exp(x) - 1)``."""
    return stateless(name, lambda x: act.elu(x, alpha))


def gelu(approximate: bool = True, name: str = "gelu") -> Layer:
    """GELU, tanh approximation (default) or exact ``x Phi(x)``."""
    return stateless(name, act.gelu if approximate else act.gelu_exact)


def silu(name: str = "silu") -> Layer:
    """``x sigmoid(x)``."""
    return stateless(name, act.silu)


def tanh(name: str = "tanh") -> Layer:
    """``tanh(x)``."""
    return stateless(name, act.tanh)


def sigmoid(name: str = "sigmoid") -> Layer:
    """``1 / (1 + exp(-x))``."""
    return stateless(name, act.sigmoid)


def softplus(name: str = "softplus") -> Layer:
    """``log(1 + exp(x))``."""
    return stateless(name, act.softplus)


# -------------------------------------------------------------------------------- dropout
def dropout(rate: float, name: str = "dropout") -> Layer:
    """Inverted dropout: in training ``y = x * m / (1 - rate)``, ``m ~ Bernoulli(1 - rate)``
    drawn from the explicit ``key``; identity when ``train=False`` or ``rate == 0``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}: rate must be in [0, 1), got {rate}.")

    def init(key, in_shape, dtype=jnp.float32):
        return {}, tuple(in_shape)

    def forward(params, x, *, key=None, train=False):
        if not train or rate == 0.0:
            return x
        if key is None:
            raise ValueError(f"{name}: train=True needs a PRNG key; call apply(params, x, "
                             "key=jax.random.key(...), train=True) or pass train=False.")
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))

    return Layer(name, init, forward)


# ---------------------------------------------------------------------------- normalisers
def layer_norm(eps: float = 1e-5, *, fused: bool = True, name: str = "layer_norm") -> Layer:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis; x ``(..., d)``.

    Params ``scale (d,)`` (ones), ``bias (d,)`` (zeros). ``fused=True`` uses
    ``bpkit.ops.layer_norm`` (hand-derived backward), ``False`` the unfused reference.
    """
    norm = ops.layer_norm if fused else ops.reference.layer_norm

    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) < 1:
            raise shape_error(name, "needs inputs with a feature axis.")
        d = in_shape[-1]
        return {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}, tuple(in_shape)

    def forward(params, x, *, key=None, train=False):
        return norm(x, params["scale"], params["bias"], eps)

    return Layer(name, init, forward)


def rms_norm(eps: float = 1e-6, name: str = "rms_norm") -> Layer:
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis; x ``(..., d)``, scale ``(d,)``."""
    def init(key, in_shape, dtype=jnp.float32):
        return {"scale": jnp.ones((in_shape[-1],), dtype)}, tuple(in_shape)

    def forward(params, x, *, key=None, train=False):
        rms_inv = lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)  # (..., 1)
        return x * rms_inv * _lead(x, params["scale"])

    return Layer(name, init, forward)


def batch_norm(momentum: float = 0.9, eps: float = 1e-5, name: str = "batch_norm") -> Layer:
    """Batch normalisation over every axis but the last (features).

    Training: ``y = (x - mu_B) / sqrt(var_B + eps) * scale + bias`` with the batch statistics,
    and the running statistics become ``m * running + (1 - m) * batch``. Evaluation uses the
    running statistics. State ``{"mean": (C,), "var": (C,)}`` is explicit:
    ``apply(params, x, state=state, train=...) -> (y, new_state)`` (unchanged in evaluation).
    """
    def init(key, in_shape, dtype=jnp.float32):
        c = in_shape[-1]
        return {"scale": jnp.ones((c,), dtype), "bias": jnp.zeros((c,), dtype)}, tuple(in_shape)

    def init_state(in_shape, dtype=jnp.float32):
        c = in_shape[-1]
        return {"mean": jnp.zeros((c,), dtype), "var": jnp.ones((c,), dtype)}

    def forward(params, x, *, key=None, train=False, state=None):
        if state is None:
            raise ValueError(f"{name}: pass the running statistics, apply(params, x, "
                             f"state=layer.init_state(in_shape)); got state=None.")
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = jnp.mean(x, axis=axes)  # (C,)
            var = jnp.mean(jnp.square(x - _lead(x, mean)), axis=axes)  # (C,)
            new_state = {
                "mean": momentum * state["mean"] + (1.0 - momentum) * lax.stop_gradient(mean),
                "var": momentum * state["var"] + (1.0 - momentum) * lax.stop_gradient(var)}
        else:
            mean, var, new_state = state["mean"], state["var"], state
        xhat = (x - _lead(x, mean)) * _lead(x, lax.rsqrt(var + eps))
        return xhat * _lead(x, params["scale"]) + _lead(x, params["bias"]), new_state

    return Layer(name, init, forward, init_state)


# ----------------------------------------------------------------------------- embeddings
def embedding(vocab_size: int, features: int, *, w_init: Initializer | None = None,
              name: str = "embedding") -> Layer:
    """Table lookup: integer tokens ``(B, ...)`` -> ``(B, ..., features)``; table ``(V, d)``
    (normal, std 0.02)."""
    w_init = w_init or initializers.normal(0.02)

    def init(key, in_shape, dtype=jnp.float32):
        return {"table": w_init(key, (vocab_size, features), dtype)}, tuple(in_shape) + (features,)

    def forward(params, x, *, key=None, train=False):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name}: expects integer token ids, got {x.dtype}.")
        return jnp.take(params["table"], x, axis=0)  # (B, ..., d)

    return Layer(name, init, forward)


def positional_embedding(max_len: int, *, w_init: Initializer | None = None,
                         name: str = "pos_embedding") -> Layer:
    """Learned positions: ``y[b, t] = x[b, t] + table[t]``; x ``(B, T, d)`` with ``T <= max_len``,
    table ``(max_len, d)`` (normal, std 0.02)."""
    w_init = w_init or initializers.normal(0.02)

    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) != 2:
            raise shape_error(name, f"expects (T, d) per example, got {tuple(in_shape)}.")
        if in_shape[0] > max_len:
            raise shape_error(name, f"sequence length {in_shape[0]} exceeds max_len={max_len}.")
        return {"table": w_init(key, (max_len, in_shape[1]), dtype)}, tuple(in_shape)

    def forward(params, x, *, key=None, train=False):
        t = x.shape[1]
        if t > max_len:
            raise ValueError(f"{name}: sequence length {t} exceeds max_len={max_len}.")
        return x + params["table"][None, :t]  # (B, T, d)

    return Layer(name, init, forward)
