"""Ready-made models for the ``funnn`` command: each a network, a loss and its recipe.

A :class:`Recipe` says how to build the network for a dataset, which loss it trains
on, how the inputs and targets are shaped for it, and its default optimizer,
learning rate, epochs and batch size. The defaults are what the README's figures
were measured with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from funnn import layers as L
from funnn import losses
from funnn.core import ConfigError

__all__ = ["Recipe", "RECIPES", "get", "mlp", "cnn", "rnn", "sigmoid_net", "prepare",
           "input_stats"]


def mlp(num_outputs: int, hidden=(128,), activation: str = "relu"):
    """``dense(h) -> activation -> ... -> dense(num_outputs)``: logits."""
    body = [l for h in hidden for l in (L.dense(h, w_init="he_normal"), L.activation(activation))]
    return L.serial(*body, L.dense(num_outputs))


def sigmoid_net(num_outputs: int, hidden=(30,)):
    """The ``[in, 30, 10]`` network of Nielsen's book *Neural Networks and Deep Learning*
    (the source seed 002 follows): sigmoid everywhere, outputs in (0, 1)."""
    body = [l for h in hidden for l in (L.dense(h, w_init="normal"), L.activation("sigmoid"))]
    return L.serial(*body, L.dense(num_outputs, w_init="normal"), L.activation("sigmoid"))


def cnn(num_outputs: int, channels=(16, 32)):
    """conv 3x3 -> ReLU -> max-pool 2 -> conv 3x3 -> ReLU -> max-pool 2 -> dense: logits."""
    c1, c2 = channels
    return L.serial(
        L.conv2d(c1, (3, 3), padding="SAME", w_init="he_normal"), L.activation("relu"),
        L.max_pool((2, 2)),
        L.conv2d(c2, (3, 3), padding="SAME", w_init="he_normal"), L.activation("relu"),
        L.max_pool((2, 2)),
        L.flatten(), L.dense(num_outputs))


def rnn(num_outputs: int, hidden: int = 64):
    """An LSTM reads an image row by row (rows are time steps); a dense layer reads its last
    state."""
    return L.serial(L.lstm(hidden, return_sequences=False), L.dense(num_outputs))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to train one model: builder, loss, input layout, target layout and defaults."""

    name: str
    build: Callable          # build(num_outputs) -> Layer
    loss: object
    inputs: str              # "flat", "image" (N, H, W, C) or "sequence" (N, T, F)
    one_hot: bool            # targets as one-hot rows (quadratic cost) or integer labels
    optimizer: str
    learning_rate: float
    epochs: int
    batch_size: int
    about: str
    schedule: str = "constant"
    standardize: bool = False  # inputs to zero mean, unit-ish variance with train statistics


RECIPES = {
    "mlp": Recipe("mlp", lambda n: mlp(n, hidden=(512,)), losses.softmax_cross_entropy, "flat",
                  False, "adamw", 3e-3, 30, 32,
                  "64-512-10 ReLU network on standardised inputs, softmax cross-entropy",
                  schedule="cosine", standardize=True),
    "sigmoid": Recipe("sigmoid", sigmoid_net, losses.squared_error.with_reduction("mean"), "flat",
                      True, "sgd", 3.0, 30, 10,
                      "the [64, 30, 10] sigmoid network of Nielsen's book Neural Networks "
                      "and Deep Learning, quadratic cost"),
    "cnn": Recipe("cnn", cnn, losses.softmax_cross_entropy, "image", False, "adam", 2e-3, 20, 32,
                  "conv-ReLU-pool x2 then dense, softmax cross-entropy"),
    "rnn": Recipe("rnn", rnn, losses.softmax_cross_entropy, "sequence", False, "adam", 5e-3, 20,
                  32, "LSTM(64) over image rows, last state to dense"),
}


def get(name: str) -> Recipe:
    """The recipe for a model name; unknown names list the valid ones."""
    if name not in RECIPES:
        raise ConfigError(f"unknown model {name!r}; valid: {', '.join(RECIPES)}", ("models",))
    return RECIPES[name]


def input_stats(dataset) -> tuple:
    """Per-feature ``(mean, scale)`` of a training set; ``scale = std + 0.1`` so constant
    pixels (the digits' empty border) stay finite."""
    x = jnp.asarray(dataset.x)
    return x.mean(0), x.std(0) + 0.1


def prepare(recipe: Recipe, dataset, stats=None):
    """``(x, y)`` laid out for the recipe: flat rows, images, or sequences; labels or one-hot.

    With ``recipe.standardize``, inputs become ``(x - mean) / scale`` using ``stats``
    from :func:`input_stats` of the training set (computed from ``dataset`` if omitted).
    """
    x = jnp.asarray(dataset.x)
    if recipe.standardize:
        mean, scale = stats if stats is not None else input_stats(dataset)
        x = (x - mean) / scale
    n = x.shape[0]
    if recipe.inputs in ("image", "sequence"):
        if x.ndim == 4:
            images = x
        else:
            side = math.isqrt(int(math.prod(x.shape[1:])))
            if x.ndim != 2 or side * side != x.shape[1]:
                raise ConfigError(f"model {recipe.name!r} needs square images (digits or "
                                  f"mnist); dataset {dataset.name!r} has inputs of shape "
                                  f"{tuple(x.shape[1:])}", ("models",))
            images = x.reshape(n, side, side, 1)
        x = images if recipe.inputs == "image" else images[..., 0]
    else:
        x = x.reshape(n, -1)
    y = jnp.asarray(dataset.y)
    if dataset.num_classes == 0:
        if recipe.loss is losses.softmax_cross_entropy or recipe.one_hot:
            raise ConfigError(f"model {recipe.name!r} classifies; dataset {dataset.name!r} is a "
                              f"regression task", ("models",))
    elif recipe.one_hot:
        y = jax.nn.one_hot(y, dataset.num_classes, dtype=x.dtype)
    return x, y
