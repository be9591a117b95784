"""Reference models built from ``bpkit.nn``; each is a ``Model(init, apply)``:
``init(key) -> params``, ``apply(params, x, *, key=None, train=False) -> output``.

===================  =================================  ==================================
factory              input                              output
===================  =================================  ==================================
logreg, mlp          (B, in_features)                   logits (B, classes)
cnn1d                (B, L) (as (B, L, 1))              logits (B, classes)
cnn2d                (B, H, W, C) or (B, H*W*C)         logits (B, classes)
gru_classifier,      (B, T) scalars or (B, T, F)        logits (B, classes)
lstm_classifier
gpt                  int tokens (B, T)                  logits (B, T, V); see generate
residual_mlp,        (B, in_features)                   logits (B, classes)
sigmoid_mlp
gan_2d               z (B, latent) / x (B, 2)           x (B, 2) / logits (B,)
regression_mlp       (B, in) or (B,)                    (B, out)
seq2seq_transformer  (source (B, S), target_in (B, T))  logits (B, T, V); greedy_decode
ddpm_mlp             (x_t (B, D), t (B,) int)           noise (B, D); see models.diffusion
policy_mlp           observations (B, obs_dim)          action logits (B, num_actions)
===================  =================================  ==================================
"""
from bpkit.models.classic import (
    cnn1d,
    cnn2d,
    gan_2d,
    logreg,
    mlp,
    regression_mlp,
    residual_mlp,
    sigmoid_mlp,
)
from bpkit.models.core import Model, from_layer
from bpkit.models.diffusion import ddpm_mlp
from bpkit.models.gpt import generate, gpt
from bpkit.models.recurrent import gru_classifier, lstm_classifier
from bpkit.models.rl import policy_mlp
from bpkit.models.seq2seq import greedy_decode, seq2seq_transformer

__all__ = ["Model", "from_layer", "logreg", "mlp", "cnn1d", "cnn2d", "gru_classifier",
           "lstm_classifier", "gpt", "generate", "residual_mlp", "sigmoid_mlp", "gan_2d",
           "regression_mlp", "seq2seq_transformer", "greedy_decode",
           "ddpm_mlp", "policy_mlp"]
