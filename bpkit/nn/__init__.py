"""Layers as pure ``init``/``apply`` pairs over plain nested-dict parameters.

>>> net = nn.sequential(nn.dense(64), nn.relu(), nn.dense(10))
>>> params, out_shape = net.init(jax.random.key(0), (40,))
>>> nn.param_paths(params)  # ['dense_0/b', 'dense_0/w', 'dense_1/b', 'dense_1/w']
>>> logits = net.apply(params, x)                             # x (B, 40) -> (B, 10)

See ``bpkit.nn.core`` for the contract (shapes, names, state) and the combinators.
"""
from bpkit.nn import activations, losses
from bpkit.nn.attention import (
    cross_attention,
    decoder_block,
    self_attention,
    transformer_block,
)
from bpkit.nn.core import (
    Layer,
    ShapeError,
    cast,
    layer,
    param_paths,
    parallel,
    residual,
    sequential,
    stateless,
)
from bpkit.nn.layers import (
    ACTIVATIONS,
    activation,
    avg_pool1d,
    avg_pool2d,
    batch_norm,
    conv1d,
    conv2d,
    dense,
    dropout,
    elu,
    embedding,
    flatten,
    gelu,
    global_avg_pool,
    layer_norm,
    leaky_relu,
    max_pool1d,
    max_pool2d,
    positional_embedding,
    relu,
    reshape,
    rms_norm,
    sigmoid,
    silu,
    softplus,
    tanh,
)
from bpkit.nn.low_rank import lora, lora_join, lora_merge, lora_split
from bpkit.nn.recurrent import gru, lstm, rnn

__all__ = [
    "Layer", "ShapeError", "layer", "stateless", "sequential", "residual", "parallel", "cast",
    "param_paths", "dense", "conv1d", "conv2d", "max_pool1d", "avg_pool1d", "max_pool2d",
    "avg_pool2d", "global_avg_pool", "flatten", "reshape", "activation", "ACTIVATIONS", "relu",
    "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid", "softplus", "dropout", "layer_norm",
    "rms_norm", "batch_norm", "embedding", "positional_embedding", "self_attention",
    "transformer_block", "cross_attention", "decoder_block", "rnn", "gru", "lstm",
    "lora", "lora_merge", "lora_split", "lora_join", "activations", "losses",
]
