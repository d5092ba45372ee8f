"""Dropout: randomly zero units in training, identity at inference, with its hand-written backward.

``rate`` is the DROP probability (``dropout(0.1)`` zeroes about 10% of units). stax's
``Dropout(rate)`` takes the KEEP probability instead; funnn follows PyTorch, Keras and
Flax here. Kept units are scaled by ``1 / (1 - rate)`` ("inverted dropout"), so the
expected output equals the input and inference needs no rescaling.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from funnn.core import ConfigError, KeyMissingError, Layer, check_floating, check_in_shape
from funnn.layers.per_example import paramless

__all__ = ["dropout"]


def _check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise ConfigError(f"rate must be a number in [0, 1) (the drop probability), "
                          f"got {type(rate).__name__} {rate!r}", ("dropout",))
    r = float(rate)
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise ConfigError(f"rate must be in [0, 1) (the drop probability), got {rate!r}; "
                          f"rate=1 would drop everything, and funnn's rate is the drop "
                          f"probability, not stax's keep probability", ("dropout",))
    return r


def dropout(rate: float) -> Layer:
    """Inverted dropout with drop probability ``rate``.

    Training (``train=True``): ``y = x * m`` with ``m = bernoulli(key, 1 - rate) / (1 - rate)``,
    drawn with shape ``x.shape`` from the explicit ``key`` (required). Inference, or
    ``rate == 0``: ``y = x``.
    Shapes: ``x (...) -> y (...)``, any shape. Params: ``{}``.
    Residuals: the scaled mask ``m`` (``None`` when the layer is the identity).
    Derivative: ``dx = dy * m`` with the same mask as the forward; ``dx = dy`` at inference.
    """
    r = _check_rate(rate)
    name = f"dropout({r:g})"
    keep = 1.0 - r

    def init(key, in_shape):
        return check_in_shape(name, in_shape, min_rank=1, allow_none=True), {}

    def _mask(x, key, train):
        """The scaled mask ``m`` (dtype of ``x``), or ``None`` when dropout is the identity."""
        check_floating(name, x)
        if not train or r == 0.0:
            return None
        if key is None:
            raise KeyMissingError(
                "training mode needs a PRNG key to draw the dropout mask; pass "
                "key=jax.random.key(seed) (split a fresh one each step), or train=False "
                "for inference", (name,))
        kept = jax.random.bernoulli(key, keep, jnp.shape(x))
        return jnp.where(kept, jnp.asarray(1.0 / keep, jnp.result_type(x)),
                         jnp.zeros((), jnp.result_type(x)))

    def apply(params, x, *, key=None, train=False):
        m = _mask(x, key, train)
        return x if m is None else x * m

    def forward(params, x, *, key=None, train=False):
        m = _mask(x, key, train)
        return (x, None) if m is None else (x * m, m)

    def backward(params, res, dy):
        return {}, dy if res is None else dy * res

    def jvp(params, res, dparams, dx):
        """Tangent: ``dx * m`` with the forward's mask (``dx`` at inference)."""
        return dx if res is None else dx * res

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 **paramless(backward), kind="dropout", jvp=jvp)
