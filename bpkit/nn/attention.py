"""Multi-head self- and cross-attention, and the pre-LN Transformer blocks (decoder-only /
encoder, and the encoder-decoder's decoder block)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bpkit import ops
from bpkit.nn import activations as act
from bpkit.nn.core import Layer, shape_error
from bpkit.nn.layers import dense, dropout, layer_norm


def _model_width(name: str, in_shape, num_heads: int) -> int:
    """``d`` of a ``(T, d)`` per-example input shape, checked to split into ``num_heads``."""
    if len(in_shape) != 2:
        raise shape_error(name, f"expects (T, d) per example, got {tuple(in_shape)}.")
    d = in_shape[-1]
    if d % num_heads:
        raise shape_error(name, f"model width {d} is not divisible by num_heads={num_heads}.")
    return d


def _identity(layer: Layer) -> Layer:
    return layer


def self_attention(num_heads: int, *, causal: bool = False, fused: bool = True,
                   dropout_rate: float = 0.0, adapt=None, name: str = "attn") -> Layer:
    """Multi-head self-attention.

    With ``x (B, T, d)``, ``H`` heads of size ``D = d / H``::

        q, k, v = split(x W_qkv + b_qkv)               each (B, T, H, D)
        a       = softmax(q k^T / sqrt(D) [causal]) v  (B, T, H, D)
        y       = concat_heads(a) W_proj + b_proj      (B, T, d)

    Params ``qkv/{w (d, 3d), b}``, ``proj/{w (d, d), b}``. ``fused=True`` uses
    ``bpkit.ops.attention`` (backward from a saved log-sum-exp), ``False`` the reference.
    Dropout (if any) is applied to the output projection in training. ``adapt`` (optional)
    wraps both projections, e.g. ``functools.partial(nn.lora, rank=4)`` (``bpkit.nn.low_rank``).
    """
    attend = ops.attention if fused else ops.reference.attention
    drop = dropout(dropout_rate)
    adapt = adapt or _identity

    def init(key, in_shape, dtype=jnp.float32):
        d = _model_width(name, in_shape, num_heads)
        k1, k2 = jax.random.split(key)
        return {"qkv": adapt(dense(3 * d)).init(k1, in_shape, dtype)[0],
                "proj": adapt(dense(d)).init(k2, in_shape, dtype)[0]}, tuple(in_shape)

    def forward(params, x, *, key=None, train=False):
        b, t, d = x.shape
        hd = d // num_heads
        qkv = adapt(dense(3 * d, name="qkv")).apply(params["qkv"], x)  # (B, T, 3d)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, num_heads, hd), 3, axis=2)  # (B, T, 1, H, D)
        q, k, v = (jnp.squeeze(a, axis=2) for a in (q, k, v))  # (B, T, H, D)
        a = attend(q, k, v, causal=causal).reshape(b, t, d)  # (B, T, d)
        y = adapt(dense(d, name="proj")).apply(params["proj"], a)  # (B, T, d)
        return drop.apply({}, y, key=key, train=train)

    return Layer(name, init, forward)


def transformer_block(num_heads: int, *, mlp_ratio: int = 4, causal: bool = True,
                      dropout_rate: float = 0.0, fused: bool = True, adapt=None,
                      name: str = "block") -> Layer:
    """Pre-LN Transformer block (GPT-2)::

        x = x + attn(ln_1(x))                  (B, T, d)
        x = x + mlp(ln_2(x))                   mlp: dense(4d) -> gelu (tanh) -> dense(d)

    Params ``ln_1``, ``attn/{qkv, proj}``, ``ln_2``, ``mlp/{fc, proj}``. ``adapt`` (optional,
    e.g. ``functools.partial(nn.lora, rank=4)``) wraps the four dense projections.
    """
    ln_1, ln_2 = layer_norm(fused=fused, name="ln_1"), layer_norm(fused=fused, name="ln_2")
    attn = self_attention(num_heads, causal=causal, fused=fused, dropout_rate=dropout_rate,
                          adapt=adapt)
    mlp = _block_mlp(mlp_ratio, dropout_rate, adapt)

    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) != 2:
            raise shape_error(name, f"expects (T, d) per example, got {tuple(in_shape)}.")
        k1, k2 = jax.random.split(key)
        return {"ln_1": ln_1.init(key, in_shape, dtype)[0],
                "attn": attn.init(k1, in_shape, dtype)[0],
                "ln_2": ln_2.init(key, in_shape, dtype)[0],
                "mlp": mlp.init(k2, in_shape, dtype)[0]}, tuple(in_shape)

    def forward(params, x, *, key=None, train=False):
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        x = x + attn.apply(params["attn"], ln_1.apply(params["ln_1"], x), key=k1, train=train)
        return x + mlp.apply(params["mlp"], ln_2.apply(params["ln_2"], x), key=k2, train=train)

    return Layer(name, init, forward)


def _block_mlp(mlp_ratio: int, dropout_rate: float, adapt=None, name: str = "mlp") -> Layer:
    """The blocks' MLP: ``dense(ratio d) -> gelu (tanh) -> dense(d) -> dropout``; params
    ``fc``, ``proj`` (each wrapped by ``adapt`` when given)."""
    drop = dropout(dropout_rate)
    adapt = adapt or _identity

    def init(key, in_shape, dtype=jnp.float32):
        d = in_shape[-1]
        k1, k2 = jax.random.split(key)
        hidden = tuple(in_shape[:-1]) + (mlp_ratio * d,)
        return {"fc": adapt(dense(mlp_ratio * d)).init(k1, in_shape, dtype)[0],
                "proj": adapt(dense(d)).init(k2, hidden, dtype)[0]}, tuple(in_shape)

    def forward(params, x, *, key=None, train=False):
        d = x.shape[-1]
        h = adapt(dense(mlp_ratio * d, name="fc")).apply(params["fc"], x)  # (B, T, ratio d)
        h = adapt(dense(d, name="proj")).apply(params["proj"], act.gelu(h))  # (B, T, d)
        return drop.apply({}, h, key=key, train=train)

    return Layer(name, init, forward)


def cross_attention(num_heads: int, *, fused: bool = True, dropout_rate: float = 0.0,
                    name: str = "cross_attn") -> Layer:
    """Multi-head cross-attention: queries from ``x``, keys and values from ``memory`` (the
    encoder's output), every query sees every memory position.

    With ``x (B, Tq, d)``, ``memory (B, Tk, d)``, ``H`` heads of size ``D = d / H``::

        q    = x W_q + b_q                           (B, Tq, H, D)
        k, v = split(memory W_kv + b_kv)             each (B, Tk, H, D)
        a    = softmax(q k^T / sqrt(D)) v            (B, Tq, H, D)
        y    = concat_heads(a) W_proj + b_proj       (B, Tq, d)

    ``apply(params, x, memory=memory)``. Params ``q/{w (d, d), b}``, ``kv/{w (d, 2d), b}``,
    ``proj/{w (d, d), b}``. ``fused=True`` uses ``bpkit.ops.attention`` (``Tq != Tk`` allowed),
    ``False`` the reference. Dropout (if any) is applied to the output projection in training.
    """
    attend = ops.attention if fused else ops.reference.attention
    drop = dropout(dropout_rate)

    def init(key, in_shape, dtype=jnp.float32):
        d = _model_width(name, in_shape, num_heads)
        k1, k2, k3 = jax.random.split(key, 3)
        return {"q": dense(d).init(k1, in_shape, dtype)[0],
                "kv": dense(2 * d).init(k2, in_shape, dtype)[0],
                "proj": dense(d).init(k3, in_shape, dtype)[0]}, tuple(in_shape)

    def forward(params, x, *, memory=None, key=None, train=False):
        if memory is None or memory.ndim != 3 or memory.shape[0] != x.shape[0] \
                or memory.shape[-1] != x.shape[-1]:
            raise ValueError(f"{name}: pass memory=(B, Tk, d) with the batch and width of x "
                             f"{tuple(x.shape)}; got "
                             f"{None if memory is None else tuple(memory.shape)}.")
        b, tq, d = x.shape
        tk, hd = memory.shape[1], d // num_heads
        q = dense(d, name="q").apply(params["q"], x).reshape(b, tq, num_heads, hd)
        kv = dense(2 * d, name="kv").apply(params["kv"], memory)  # (B, Tk, 2d)
        k, v = jnp.split(kv.reshape(b, tk, 2, num_heads, hd), 2, axis=2)  # (B, Tk, 1, H, D)
        a = attend(q, jnp.squeeze(k, 2), jnp.squeeze(v, 2)).reshape(b, tq, d)  # (B, Tq, d)
        y = dense(d, name="proj").apply(params["proj"], a)  # (B, Tq, d)
        return drop.apply({}, y, key=key, train=train)

    return Layer(name, init, forward)


def decoder_block(num_heads: int, *, mlp_ratio: int = 4, dropout_rate: float = 0.0,
                  fused: bool = True, name: str = "decoder_block") -> Layer:
    """Pre-LN decoder block of an encoder-decoder Transformer::

        x = x + self_attn(ln_1(x))             causal: position i sees targets <= i
        x = x + cross_attn(ln_2(x), memory)    every encoder position
        x = x + mlp(ln_3(x))                   dense(4d) -> gelu (tanh) -> dense(d)

    ``apply(params, x, memory=memory)``: x ``(B, Tq, d)``, memory ``(B, Tk, d)``. Params
    ``ln_1``, ``self_attn/{qkv, proj}``, ``ln_2``, ``cross_attn/{q, kv, proj}``, ``ln_3``,
    ``mlp/{fc, proj}``.
    """
    lns = [layer_norm(fused=fused, name=f"ln_{i}") for i in (1, 2, 3)]
    self_attn = self_attention(num_heads, causal=True, fused=fused, dropout_rate=dropout_rate,
                               name="self_attn")
    cross = cross_attention(num_heads, fused=fused, dropout_rate=dropout_rate)
    mlp = _block_mlp(mlp_ratio, dropout_rate)

    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) != 2:
            raise shape_error(name, f"expects (T, d) per example, got {tuple(in_shape)}.")
        k1, k2, k3 = jax.random.split(key, 3)
        params = {ln.name: ln.init(key, in_shape, dtype)[0] for ln in lns}
        params.update({"self_attn": self_attn.init(k1, in_shape, dtype)[0],
                       "cross_attn": cross.init(k2, in_shape, dtype)[0],
                       "mlp": mlp.init(k3, in_shape, dtype)[0]})
        return params, tuple(in_shape)

    def forward(params, x, *, memory=None, key=None, train=False):
        k1, k2, k3 = (None,) * 3 if key is None else jax.random.split(key, 3)
        x = x + self_attn.apply(params["self_attn"], lns[0].apply(params["ln_1"], x), key=k1,
                                train=train)
        x = x + cross.apply(params["cross_attn"], lns[1].apply(params["ln_2"], x),
                            memory=memory, key=k2, train=train)
        return x + mlp.apply(params["mlp"], lns[2].apply(params["ln_3"], x), key=k3, train=train)

    return Layer(name, init, forward)
