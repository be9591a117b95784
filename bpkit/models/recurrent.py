"""Sequence classifiers: a GRU or LSTM over time, its last hidden state, a linear head."""
from __future__ import annotations

from bpkit import nn
from bpkit.models.core import Model, from_layer


def _seq_classifier(cell, in_features, num_classes, name) -> Model:
    net = nn.sequential(cell, nn.dense(num_classes, name="head"), name=name)

    def prepare(x):
        return x[..., None] if x.ndim == 2 else x  # (B, T) scalars -> (B, T, 1)

    return from_layer(net, (1, in_features), prepare=prepare)  # T is free: any length works


def gru_classifier(in_features: int = 1, hidden: int = 128, num_classes: int = 10) -> Model:
    """``x (B, T)`` or ``(B, T, F)`` -> GRU -> last ``h (B, hidden)`` -> logits
    ``(B, classes)``."""
    return _seq_classifier(nn.gru(hidden, return_sequences=False), in_features, num_classes,
                           "gru_classifier")


def lstm_classifier(in_features: int = 1, hidden: int = 128, num_classes: int = 10) -> Model:
    """``x (B, T)`` or ``(B, T, F)`` -> LSTM -> last ``h (B, hidden)`` -> logits
    ``(B, classes)``."""
    return _seq_classifier(nn.lstm(hidden, return_sequences=False), in_features, num_classes,
                           "lstm_classifier")
