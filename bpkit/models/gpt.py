"""A GPT-style (pre-LN, GPT-2) character language model and autoregressive sampling."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bpkit import nn
from bpkit.models.core import Model


def gpt(vocab_size: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
        context: int = 128, dropout: float = 0.0, *, fused: bool = True, lora_rank: int = 0,
        lora_alpha: float = 8.0) -> Model:
    """Tokens ``(B, T)`` int32, ``T <= context`` -> logits ``(B, T, vocab_size)``::

        x = tok_emb[tokens] + pos_emb[:T]          (B, T, d)
        x = dropout(x)
        x = block_i(x)  for i < n_layers           causal pre-LN blocks
        logits = ln_f(x) W_head + b_head           (B, T, V)

    Params ``tok_emb``, ``pos_emb``, ``block_{i}/{ln_1, attn/{qkv, proj}, ln_2, mlp/{fc,
    proj}}``, ``ln_f``, ``head``. ``fused`` selects the fused attention/layer-norm ops.
    ``lora_rank > 0`` adds LoRA adapters (``nn.lora``, scale ``lora_alpha / lora_rank``) to
    every block's four projections (``.../lora_a``, ``.../lora_b``); the other parameters are
    those of the model without them, so a pre-trained checkpoint loads into it (``init_from``)
    and ``nn.lora_merge(params, lora_alpha)`` gives that model's parameters back.
    """
    if d_model % n_heads:
        raise ValueError(f"gpt: d_model={d_model} must be divisible by n_heads={n_heads}.")
    adapt = functools.partial(nn.lora, rank=lora_rank, alpha=lora_alpha) if lora_rank else None
    tok = nn.embedding(vocab_size, d_model, name="tok_emb")
    pos = nn.positional_embedding(context, name="pos_emb")
    drop = nn.dropout(dropout)
    blocks = [nn.transformer_block(n_heads, causal=True, dropout_rate=dropout, fused=fused,
                                   adapt=adapt, name=f"block_{i}") for i in range(n_layers)]
    ln_f = nn.layer_norm(fused=fused, name="ln_f")
    head = nn.dense(vocab_size, name="head")

    def init(key, dtype=jnp.float32):
        keys = jax.random.split(key, n_layers + 3)
        shape = (context, d_model)
        params = {"tok_emb": tok.init(keys[0], (context,), dtype)[0],
                  "pos_emb": pos.init(keys[1], shape, dtype)[0]}
        for i, b in enumerate(blocks):
            params[b.name] = b.init(keys[2 + i], shape, dtype)[0]
        params["ln_f"] = ln_f.init(keys[-1], shape, dtype)[0]
        params["head"] = head.init(keys[-1], shape, dtype)[0]
        return params

    def apply(params, tokens, *, key=None, train=False):
        if tokens.ndim != 2 or tokens.shape[1] > context:
            raise ValueError(f"gpt: expects tokens (B, T) with T <= context={context}, got "
                             f"{tokens.shape}.")
        keys = [None] * (n_layers + 1) if key is None else list(jax.random.split(key, n_layers + 1))
        x = tok.apply(params["tok_emb"], tokens)  # (B, T, d)
        x = pos.apply(params["pos_emb"], x)  # (B, T, d)
        x = drop.apply({}, x, key=keys[0], train=train)
        for i, b in enumerate(blocks):
            x = b.apply(params[b.name], x, key=keys[i + 1], train=train)  # (B, T, d)
        x = ln_f.apply(params["ln_f"], x)
        return head.apply(params["head"], x)  # (B, T, V)

    return Model(init, apply)


def generate(model: Model, params, key, prompt_tokens, steps: int, temperature: float = 1.0):
    """Sample ``steps`` tokens after ``prompt_tokens`` (``(B, T0)`` or ``(T0,)``, T0 >= 1).

    Each step runs the model on the last ``context`` tokens (``context`` is read from
    ``params["pos_emb"]["table"]``) and samples from ``softmax(logits / temperature)`` at the
    last position (``temperature``, a Python float; ``0``: argmax). Returns the prompt
    followed by the samples, ``(B, T0 + steps)`` (or ``(T0 + steps,)``).
    Runs as one ``lax.scan``; jit it for speed.
    """
    prompt = jnp.asarray(prompt_tokens)
    squeeze = prompt.ndim == 1
    prompt = prompt[None] if squeeze else prompt  # (B, T0)
    b, t0 = prompt.shape
    if t0 < 1:
        raise ValueError("generate: the prompt needs at least one token.")
    context = params["pos_emb"]["table"].shape[0]
    total = t0 + steps
    window = min(context, total)
    buf = jnp.concatenate([prompt, jnp.zeros((b, steps), prompt.dtype)], axis=1)  # (B, total)

    def step(buf, inp):
        n, k = inp  # n: tokens so far
        start = jnp.maximum(n - window, 0)
        tokens = lax.dynamic_slice(buf, (jnp.zeros((), start.dtype), start), (b, window))
        logits = model.apply(params, tokens)  # (B, window, V); causal: padding is not seen
        last = lax.dynamic_index_in_dim(logits, n - 1 - start, axis=1, keepdims=False)  # (B, V)
        if temperature == 0:
            nxt = jnp.argmax(last, axis=-1)
        else:
            nxt = jax.random.categorical(k, last / temperature, axis=-1)
        buf = lax.dynamic_update_slice(buf, nxt.astype(buf.dtype)[:, None],
                                       (jnp.zeros((), n.dtype), n))
        return buf, None

    ns = jnp.arange(t0, total, dtype=jnp.int32)
    buf, _ = lax.scan(step, buf, (ns, jax.random.split(key, steps)))
    return buf[0] if squeeze else buf
