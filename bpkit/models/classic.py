"""Feed-forward reference models: logistic regression, MLPs, CNNs, deep residual and deep
sigmoid MLPs, a 2-D GAN pair, and a regression MLP. All take float inputs ``(B, ...)``."""
from __future__ import annotations

from jax.nn import initializers

from bpkit import nn
from bpkit.models.core import Model, from_layer


def _check_activation(activation: str) -> str:
    if activation not in nn.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of "
                         f"{sorted(nn.ACTIVATIONS)}.")
    return activation


def logreg(in_features: int = 40, num_classes: int = 10) -> Model:
    """Multinomial logistic regression: ``logits = x W + b``; (B, in) -> (B, classes)."""
    return from_layer(nn.sequential(nn.dense(num_classes, name="linear"), name="logreg"),
                      (in_features,))


def mlp(in_features: int = 40, hidden=(256, 256), num_classes: int = 10,
        activation: str = "relu") -> Model:
    """``dense -> act`` per hidden width, then a linear head; (B, in) -> (B, classes).
    He init for ReLU-family activations, LeCun otherwise. Params ``dense_i``, ``head``."""
    _check_activation(activation)
    w_init = (initializers.he_normal() if activation in ("relu", "leaky_relu", "elu")
              else initializers.lecun_normal())
    layers = []
    for i, h in enumerate(hidden):
        layers += [nn.dense(h, w_init=w_init, name=f"dense_{i}"),
                   nn.activation(activation, name=f"{activation}_{i}")]
    layers.append(nn.dense(num_classes, name="head"))
    return from_layer(nn.sequential(*layers, name="mlp"), (in_features,))


def cnn1d(in_length: int = 40, channels=(32, 32, 32), kernel_size: int = 5,
          num_classes: int = 10, batch_norm: bool = False) -> Model:
    """1-D CNN for MNIST-1D-sized signals: input ``(B, L)`` viewed as ``(B, L, 1)``; each stage is
    ``conv1d(stride 2, SAME) -> relu`` (L halves), then flatten and a linear head.

    ``batch_norm=True`` puts a ``batch_norm`` between each convolution and its relu (the
    convolutions then have no bias: the normalisation would cancel it, leaving it a zero
    gradient); the model is then stateful (running statistics ``bn_{i}/{mean, var}``; see
    ``Model``)."""
    layers = []
    for i, c in enumerate(channels):
        layers += [nn.conv1d(c, kernel_size, stride=2, use_bias=not batch_norm,
                             name=f"conv_{i}")]
        layers += [nn.batch_norm(name=f"bn_{i}")] if batch_norm else []
        layers += [nn.relu(name=f"relu_{i}")]
    layers += [nn.flatten(), nn.dense(num_classes, name="head")]

    def prepare(x):
        return x.reshape(x.shape[0], in_length, 1) if x.ndim == 2 else x  # (B, L, 1)

    return from_layer(nn.sequential(*layers, name="cnn1d"), (in_length, 1), prepare=prepare)


def cnn2d(in_shape=(28, 28, 1), channels=(16, 32), num_classes: int = 10,
          batch_norm: bool = False, dropout: float = 0.0) -> Model:
    """2-D CNN: per stage ``conv 3x3 (SAME) -> relu -> max_pool 2x2``; then flatten and head.
    Input ``(B, H, W, C)`` (or flattened ``(B, H*W*C)``).

    ``batch_norm=True`` puts a ``batch_norm`` between each convolution and its relu (the
    convolutions then have no bias; the model is stateful, see ``cnn1d``); ``dropout > 0``
    drops that fraction of the flattened features before the head in training."""
    in_shape = tuple(in_shape)
    layers = []
    for i, c in enumerate(channels):
        layers += [nn.conv2d(c, 3, use_bias=not batch_norm, name=f"conv_{i}")]
        layers += [nn.batch_norm(name=f"bn_{i}")] if batch_norm else []
        layers += [nn.relu(name=f"relu_{i}"), nn.max_pool2d(2, name=f"pool_{i}")]
    layers += [nn.flatten()]
    layers += [nn.dropout(dropout, name="dropout")] if dropout else []
    layers += [nn.dense(num_classes, name="head")]

    def prepare(x):
        return x.reshape((x.shape[0],) + in_shape) if x.ndim == 2 else x  # (B, H, W, C)

    return from_layer(nn.sequential(*layers, name="cnn2d"), in_shape, prepare=prepare)


def residual_mlp(in_features: int = 40, width: int = 64, depth: int = 20,
                 num_classes: int = 10) -> Model:
    """Deep residual MLP: ``stem`` dense to ``width``, then ``depth`` pre-activation blocks
    ``x + dense(relu(x))`` (the branch's He init is scaled by ``1/depth`` so the activations'
    variance grows by at most ``e`` over the stack), then ``relu -> head``."""
    branch_init = initializers.variance_scaling(2.0 / depth, "fan_in", "truncated_normal")
    blocks = [nn.residual(nn.sequential(nn.relu(), nn.dense(width, w_init=branch_init),
                                        name="body"), name=f"block_{i}") for i in range(depth)]
    net = nn.sequential(nn.dense(width, name="stem"), *blocks, nn.relu(name="relu_out"),
                        nn.dense(num_classes, name="head"), name="residual_mlp")
    return from_layer(net, (in_features,))


def sigmoid_mlp(in_features: int = 40, width: int = 64, depth: int = 20,
                num_classes: int = 10) -> Model:
    """``depth`` plain ``dense -> sigmoid`` layers (Glorot init) and a linear head: the
    vanishing-gradient demonstrator (sigmoid' <= 1/4, so early layers' gradients shrink
    geometrically with depth)."""
    layers = []
    for i in range(depth):
        layers += [nn.dense(width, w_init=initializers.glorot_normal(), name=f"dense_{i}"),
                   nn.sigmoid(name=f"sigmoid_{i}")]
    layers.append(nn.dense(num_classes, name="head"))
    return from_layer(nn.sequential(*layers, name="sigmoid_mlp"), (in_features,))


def regression_mlp(in_features: int = 1, hidden=(64, 64), out_features: int = 1,
                   activation: str = "tanh") -> Model:
    """MLP for regression with MSE: (B, in) (or (B,) when in_features == 1) -> (B, out)."""
    _check_activation(activation)
    layers = []
    for i, h in enumerate(hidden):
        layers += [nn.dense(h, name=f"dense_{i}"),
                   nn.activation(activation, name=f"{activation}_{i}")]
    layers.append(nn.dense(out_features, name="head"))

    def prepare(x):
        return x.reshape(x.shape[0], 1) if x.ndim == 1 else x  # (B, in)

    return from_layer(nn.sequential(*layers, name="regression_mlp"), (in_features,),
                      prepare=prepare)


def gan_2d(latent_dim: int = 2, hidden: int = 64) -> tuple[Model, Model]:
    """Generator ``z (B, latent) -> x (B, 2)`` (two ReLU layers, linear output) and
    discriminator ``x (B, 2) -> logits (B,)`` (two leaky-ReLU layers, linear output)."""
    g = nn.sequential(nn.dense(hidden, w_init=initializers.he_normal(), name="dense_0"),
                      nn.relu(name="relu_0"),
                      nn.dense(hidden, w_init=initializers.he_normal(), name="dense_1"),
                      nn.relu(name="relu_1"), nn.dense(2, name="out"), name="generator")
    d = nn.sequential(nn.dense(hidden, name="dense_0"), nn.leaky_relu(0.2, name="lrelu_0"),
                      nn.dense(hidden, name="dense_1"), nn.leaky_relu(0.2, name="lrelu_1"),
                      nn.dense(1, name="out"), nn.reshape((), name="squeeze"),
                      name="discriminator")
    return from_layer(g, (latent_dim,)), from_layer(d, (2,))

