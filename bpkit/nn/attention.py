"""Multi-head self-attention and the pre-LN Transformer block."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bpkit import ops
from bpkit.nn import activations as act
from bpkit.nn.core import Layer, shape_error
from bpkit.nn.layers import dense, dropout, layer_norm


def self_attention(num_heads: int, *, causal: bool = False, fused: bool = True,
                   dropout_rate: float = 0.0, name: str = "attn") -> Layer:
    """Multi-head self-attention.

    With ``x (B, T, d)``, ``H`` heads of size ``D = d / H``::

        q, k, v = split(x W_qkv + b_qkv)               each (B, T, H, D)
        a       = softmax(q k^T / sqrt(D) [causal]) v  (B, T, H, D)
        y       = concat_heads(a) W_proj + b_proj      (B, T, d)

    Params ``qkv/{w (d, 3d), b}``, ``proj/{w (d, d), b}``. ``fused=True`` uses
    ``bpkit.ops.attention`` (backward from a saved log-sum-exp), ``False`` the reference.
    Dropout (if any) is applied to the output projection in training.
    """
    attend = ops.attention if fused else ops.reference.attention
    drop = dropout(dropout_rate)

    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) != 2:
            raise shape_error(name, f"expects (T, d) per example, got {tuple(in_shape)}.")
        d = in_shape[-1]
        if d % num_heads:
            raise shape_error(name, f"model width {d} is not divisible by num_heads={num_heads}.")
        k1, k2 = jax.random.split(key)
        return {"qkv": dense(3 * d).init(k1, in_shape, dtype)[0],
                "proj": dense(d).init(k2, in_shape, dtype)[0]}, tuple(in_shape)

    def forward(params, x, *, key=None, train=False):
        b, t, d = x.shape
        hd = d // num_heads
        qkv = dense(3 * d, name="qkv").apply(params["qkv"], x)  # (B, T, 3d)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, num_heads, hd), 3, axis=2)  # (B, T, 1, H, D)
        q, k, v = (jnp.squeeze(a, axis=2) for a in (q, k, v))  # (B, T, H, D)
        a = attend(q, k, v, causal=causal).reshape(b, t, d)  # (B, T, d)
        y = dense(d, name="proj").apply(params["proj"], a)  # (B, T, d)
        return drop.apply({}, y, key=key, train=train)

    return Layer(name, init, forward)


def transformer_block(num_heads: int, *, mlp_ratio: int = 4, causal: bool = True,
                      dropout_rate: float = 0.0, fused: bool = True,
                      name: str = "block") -> Layer:
    """Pre-LN Transformer block (GPT-2)::

        x = x + attn(ln_1(x))                  (B, T, d)
        x = x + mlp(ln_2(x))                   mlp: dense(4d) -> gelu (tanh) -> dense(d)

    Params ``ln_1``, ``attn/{qkv, proj}``, ``ln_2``, ``mlp/{fc, proj}``.
    """
    ln_1, ln_2 = layer_norm(fused=fused, name="ln_1"), layer_norm(fused=fused, name="ln_2")
    attn = self_attention(num_heads, causal=causal, fused=fused, dropout_rate=dropout_rate)
    drop = dropout(dropout_rate)

    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) != 2:
            raise shape_error(name, f"expects (T, d) per example, got {tuple(in_shape)}.")
        d = in_shape[-1]
        k1, k2, k3 = jax.random.split(key, 3)
        hidden = (in_shape[0], mlp_ratio * d)
        return {"ln_1": ln_1.init(key, in_shape, dtype)[0],
                "attn": attn.init(k1, in_shape, dtype)[0],
                "ln_2": ln_2.init(key, in_shape, dtype)[0],
                "mlp": {"fc": dense(mlp_ratio * d).init(k2, in_shape, dtype)[0],
                        "proj": dense(d).init(k3, hidden, dtype)[0]}}, tuple(in_shape)

    def forward(params, x, *, key=None, train=False):
        d = x.shape[-1]
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        x = x + attn.apply(params["attn"], ln_1.apply(params["ln_1"], x), key=k1, train=train)
        h = ln_2.apply(params["ln_2"], x)  # (B, T, d)
        with jax.named_scope("mlp"):
            h = dense(mlp_ratio * d, name="fc").apply(params["mlp"]["fc"], h)  # (B, T, 4d)
            h = act.gelu(h)
            h = dense(d, name="proj").apply(params["mlp"]["proj"], h)  # (B, T, d)
            h = drop.apply({}, h, key=k2, train=train)
        return x + h

    return Layer(name, init, forward)
