"""An encoder-decoder Transformer for sequence-to-sequence tasks, and greedy decoding."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bpkit import nn
from bpkit.models.core import Model


def seq2seq_transformer(vocab_size: int = 26, d_model: int = 64, n_layers: int = 2,
                        n_heads: int = 4, context: int = 20, dropout: float = 0.0, *,
                        fused: bool = True) -> Model:
    """``(source (B, S), target_in (B, T))`` int tokens, ``S, T <= context`` -> logits
    ``(B, T, vocab_size)``::

        m = src_emb[source] + enc_pos[:S]                 (B, S, d)
        m = encoder_block_i(m)  for i < n_layers          pre-LN, no mask
        m = ln_enc(m)                                     the memory
        h = tgt_emb[target_in] + dec_pos[:T]              (B, T, d)
        h = decoder_block_i(h, m)  for i < n_layers       causal self-attn, cross-attn to m
        logits = ln_f(h) W_head + b_head                  (B, T, V)

    ``target_in`` is the target shifted right behind a begin token: ``[BOS, y_0, ...,
    y_{T-2}]`` with ``BOS = vocab_size`` (``tgt_emb`` has ``vocab_size + 1`` rows), so that
    position ``t`` predicts ``y_t`` from ``y_{<t}`` and the whole source (teacher forcing in
    training; ``greedy_decode`` at test time). Params ``src_emb``, ``enc_pos``, ``encoder_{i}``,
    ``ln_enc``, ``tgt_emb``, ``dec_pos``, ``decoder_{i}``, ``ln_f``, ``head``. ``fused`` selects
    the fused attention/layer-norm ops; ``dropout`` applies to the embeddings and every
    block's residual branches in training.
    """
    if d_model % n_heads:
        raise ValueError(f"seq2seq_transformer: d_model={d_model} must be divisible by "
                         f"n_heads={n_heads}.")
    src_emb = nn.embedding(vocab_size, d_model, name="src_emb")
    tgt_emb = nn.embedding(vocab_size + 1, d_model, name="tgt_emb")
    enc_pos = nn.positional_embedding(context, name="enc_pos")
    dec_pos = nn.positional_embedding(context, name="dec_pos")
    drop = nn.dropout(dropout)
    encoders = [nn.transformer_block(n_heads, causal=False, dropout_rate=dropout, fused=fused,
                                     name=f"encoder_{i}") for i in range(n_layers)]
    decoders = [nn.decoder_block(n_heads, dropout_rate=dropout, fused=fused,
                                 name=f"decoder_{i}") for i in range(n_layers)]
    ln_enc = nn.layer_norm(fused=fused, name="ln_enc")
    ln_f = nn.layer_norm(fused=fused, name="ln_f")
    head = nn.dense(vocab_size, name="head")

    def init(key, dtype=jnp.float32):
        keys = iter(jax.random.split(key, 2 * n_layers + 5))
        shape = (context, d_model)
        params = {"src_emb": src_emb.init(next(keys), (context,), dtype)[0],
                  "enc_pos": enc_pos.init(next(keys), shape, dtype)[0],
                  "tgt_emb": tgt_emb.init(next(keys), (context,), dtype)[0],
                  "dec_pos": dec_pos.init(next(keys), shape, dtype)[0]}
        for block in encoders + decoders:
            params[block.name] = block.init(next(keys), shape, dtype)[0]
        params["ln_enc"] = ln_enc.init(key, shape, dtype)[0]
        params["ln_f"] = ln_f.init(key, shape, dtype)[0]
        params["head"] = head.init(next(keys), shape, dtype)[0]
        return params

    def apply(params, inputs, *, key=None, train=False):
        source, target_in = inputs
        for what, tokens in (("source", source), ("target_in", target_in)):
            if tokens.ndim != 2 or tokens.shape[1] > context:
                raise ValueError(f"seq2seq_transformer: expects {what} tokens (B, T) with T <= "
                                 f"context={context}, got {tokens.shape}.")
        keys = ([None] * (2 * n_layers + 2) if key is None
                else list(jax.random.split(key, 2 * n_layers + 2)))
        m = enc_pos.apply(params["enc_pos"], src_emb.apply(params["src_emb"], source))
        m = drop.apply({}, m, key=keys[0], train=train)  # (B, S, d)
        for i, block in enumerate(encoders):
            m = block.apply(params[block.name], m, key=keys[2 + i], train=train)
        m = ln_enc.apply(params["ln_enc"], m)
        h = dec_pos.apply(params["dec_pos"], tgt_emb.apply(params["tgt_emb"], target_in))
        h = drop.apply({}, h, key=keys[1], train=train)  # (B, T, d)
        for i, block in enumerate(decoders):
            h = block.apply(params[block.name], h, memory=m, key=keys[2 + n_layers + i],
                            train=train)
        return head.apply(params["head"], ln_f.apply(params["ln_f"], h))  # (B, T, V)

    return Model(init, apply)


def shift_right(target, bos: int):
    """``[BOS, y_0, ..., y_{T-2}]``: the decoder's input for target ``y (B, T)``."""
    start = jnp.full((target.shape[0], 1), bos, target.dtype)
    return jnp.concatenate([start, target[:, :-1]], axis=1)


def greedy_decode(model: Model, params, source, length: int):
    """The ``(B, length)`` target that greedy decoding produces for ``source (B, S)``: token
    ``t`` is the argmax of the logits at position ``t`` given the tokens already chosen.

    Each of the ``length`` steps runs the whole model (one ``lax.scan``); positions after
    ``t`` hold placeholders that the causal self-attention keeps from position ``t``.
    ``BOS`` is read from ``params["tgt_emb"]`` (its last row)."""
    bos = params["tgt_emb"]["table"].shape[0] - 1
    out = jnp.zeros((source.shape[0], length), jnp.int32)

    def step(out, t):
        logits = model.apply(params, (source, shift_right(out, bos)))  # (B, length, V)
        token = jnp.argmax(lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), -1)
        return lax.dynamic_update_slice(out, token.astype(jnp.int32)[:, None],
                                        (jnp.zeros((), t.dtype), t)), None

    out, _ = lax.scan(step, out, jnp.arange(length, dtype=jnp.int32))
    return out
